"""The job config: version 1 read as its exact version-2 equivalent, errors that name the field.

Pinned: an old-format config (a job-wide `init` / `per_output_scale`, sizes as override fields)
parses into exactly the config its version-2 form gives, without touching the caller's dict;
unknown fields, wrong types and out-of-range values are refused with a `ConfigError` naming
the field (at any depth); `{}` (and an empty body) is every default; the JSON round trip is
exact; method options are checked against the registry (an unknown name lists the choices).
Nothing here names a method where the check is about every method: those come from
`available_methods()`.
"""

from __future__ import annotations

import copy
import json
import re

import pytest

from compressor.config import (
    CONFIG_VERSION,
    RATIO_WITHOUT_TARGET,
    CompressionConfig,
    TargetConfig,
)
from compressor.errors import ConfigError
from compressor.methods import available_methods, method_class

# -- version 1 -> version 2 ----------------------------------------------------------------------

# (version-1 config, the version-2 config it means). Version 1: `init` was lowrank's
# initialization and made tie_rows whiten unless it was "svd"; `per_output_scale` was
# tie_inputs'; overrides set `rank` / `groups` / `values` themselves.
UPGRADES = [
    pytest.param({"init": "svd"}, {"method": {"name": "lowrank", "init": "svd"}},
                 id="init-on-the-default-method"),
    pytest.param({"method": "lowrank", "init": "activation_aware", "ratio": 0.3},
                 {"method": {"name": "lowrank", "init": "activation_aware"}, "ratio": 0.3},
                 id="init-on-lowrank"),
    pytest.param({"method": "tie_rows", "init": "svd"},
                 {"method": {"name": "tie_rows", "init": "kmeans"}}, id="tie_rows-svd-is-kmeans"),
    pytest.param({"method": "tie_rows", "init": "sequential"},
                 {"method": {"name": "tie_rows", "init": "activation_aware"}},
                 id="tie_rows-otherwise-whitened"),
    pytest.param({"method": "tie_inputs", "per_output_scale": False},
                 {"method": {"name": "tie_inputs", "per_output_scale": False}},
                 id="per_output_scale"),
    pytest.param({"method": "share_values", "init": "svd", "per_output_scale": False},
                 {"method": {"name": "share_values"}}, id="fields-the-method-does-not-take"),
    pytest.param({"version": 1, "ratio": 0.25}, {"ratio": 0.25}, id="explicit-version-1"),
    pytest.param({"overrides": [{"match": "encoder.*", "rank": 4}]},
                 {"overrides": [{"match": "encoder.*", "method": {"name": "lowrank", "rank": 4}}]},
                 id="override-rank"),
    pytest.param(
        {"init": "svd", "overrides": [{"match": "encoder.*", "rank": 4}]},
        {"method": {"name": "lowrank", "init": "svd"},
         "overrides": [{"match": "encoder.*", "method": {"name": "lowrank", "rank": 4,
                                                         "init": "svd"}}]},
        id="override-rank-keeps-the-job-init"),
    pytest.param(
        {"method": "tie_rows", "init": "svd",
         "overrides": [{"match": "a", "groups": 3}, {"match": "b", "skip": True},
                       {"match": "c", "ratio": 0.2}]},
        {"method": {"name": "tie_rows", "init": "kmeans"},
         "overrides": [{"match": "a", "method": {"name": "tie_rows", "groups": 3,
                                                 "init": "kmeans"}},
                       {"match": "b", "skip": True}, {"match": "c", "ratio": 0.2}]},
        id="overrides-of-every-shape"),
    pytest.param(
        {"init": "svd", "overrides": [{"match": "a", "method": "tie_rows", "groups": 4}]},
        {"method": {"name": "lowrank", "init": "svd"},
         "overrides": [{"match": "a", "method": {"name": "tie_rows", "groups": 4,
                                                 "init": "kmeans"}}]},
        id="override-with-its-own-method"),
    pytest.param(
        {"overrides": [{"match": "a", "method": "share_values", "values": 16}]},
        {"overrides": [{"match": "a", "method": {"name": "share_values", "values": 16}}]},
        id="override-values"),
    pytest.param(
        {"per_output_scale": False, "overrides": [{"match": "a", "method": "tie_inputs"}]},
        {"overrides": [{"match": "a", "method": {"name": "tie_inputs",
                                                 "per_output_scale": False}}]},
        id="override-method-takes-the-job-wide-option"),
    pytest.param({"overrides": [{"match": "a", "rank": None, "ratio": 0.5}]},
                 {"overrides": [{"match": "a", "ratio": 0.5}]}, id="null-size-is-no-size"),
]


@pytest.mark.parametrize(("old", "new"), UPGRADES)
def test_a_version_1_config_parses_into_its_exact_version_2_equivalent(old, new):
    given = copy.deepcopy(old)
    upgraded = CompressionConfig.parse(old)
    assert old == given  # the caller's dict (and its overrides) are not rewritten
    # Version 1 had no target mode: a version-1 config compresses to its ratio.
    expected = CompressionConfig.parse({**new, "target": None})
    assert upgraded == expected
    assert upgraded.to_dict() == expected.to_dict()
    assert upgraded.version == CONFIG_VERSION
    assert CompressionConfig.parse(json.dumps(old)) == expected  # a JSON body upgrades too
    # The upgraded config is plain version 2: reading it back changes nothing.
    assert CompressionConfig.parse(upgraded.to_dict()) == upgraded
    assert not {"init", "per_output_scale"} & set(upgraded.to_dict())


@pytest.mark.parametrize(("config", "message"), [
    ({"overrides": [{"match": "a", "rank": 2, "groups": 3}]},
     "overrides.0: give at most one of ratio, rank, groups, values"),
    ({"overrides": [{"match": "a", "rank": 2, "ratio": 0.3}]},
     "overrides.0: give at most one of ratio, rank, groups, values"),
    ({"method": "tie_rows", "overrides": [{"match": "b", "skip": True}, {"match": "a", "rank": 2}]},
     "overrides.1: override 'a' sets `rank` but its method 'tie_rows' takes groups"),
    ({"method": "tie_inputs", "overrides": [{"match": "a", "rank": 2}]},
     "takes no size"),
    ({"version": 1, "init": "bogus"}, "method.lowrank.init: "),
    ({"version": 2, "init": "svd"}, "init: unknown field"),  # version 2 has no job-wide init
    ({"version": 2, "overrides": [{"match": "a", "rank": 4}]}, "overrides.0.rank: unknown field"),
])
def test_a_version_1_config_that_cannot_mean_one_thing_is_refused(config, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        CompressionConfig.parse(config)


@pytest.mark.parametrize(("config", "read"), [
    ({"overrides": [{"match": "a", "method": {"name": "tie_rows"}, "groups": 4}]},
     lambda c: c.overrides[0].method.groups == 4),
    ({"method": {"name": "tie_rows"}, "init": "svd"}, lambda c: c.method.init == "kmeans"),
])
def test_a_version_1_field_is_never_dropped_silently(config, read):
    try:
        parsed = CompressionConfig.parse(config)
    except ConfigError:
        return  # refusing the mix is fine too
    assert read(parsed)


# -- errors name the field -----------------------------------------------------------------------


def _names_field(message: str, field: str) -> bool:
    """Whether the ConfigError message reports a problem at exactly `field`."""
    return re.search(rf"(^invalid config: |; ){re.escape(field)}: ", message) is not None


@pytest.mark.parametrize(("config", "field"), [
    # unknown fields, at every depth
    ({"bogus": 1}, "bogus"),
    ({"finetune": {"stepz": 3}}, "finetune.stepz"),
    ({"export": {"format": "onnx"}}, "export.format"),
    ({"data": {"samples": 3}}, "data.samples"),
    ({"layers": {"only": ["a"]}}, "layers.only"),
    ({"overrides": [{"match": "a", "skip": True}, {"match": "b", "size": 3}]}, "overrides.1.size"),
    # wrong types
    ({"ratio": "half"}, "ratio"),
    ({"finetune": {"steps": "many"}}, "finetune.steps"),
    ({"finetune": {"train_biases": "sometimes"}}, "finetune.train_biases"),
    ({"layers": {"include": "*"}}, "layers.include"),
    ({"overrides": {"match": "a"}}, "overrides"),
    ({"export": {"quantize": "int2"}}, "export.quantize"),
    ({"export": {"quantize": 4}}, "export.quantize"),
    # out of range
    ({"ratio": 0}, "ratio"),
    ({"ratio": 1.5}, "ratio"),
    ({"timeout_s": 0}, "timeout_s"),
    ({"min_layer_params": -1}, "min_layer_params"),
    ({"finetune": {"steps": -1}}, "finetune.steps"),
    ({"finetune": {"lr": 2.0}}, "finetune.lr"),
    ({"finetune": {"batch_size": 0}}, "finetune.batch_size"),
    ({"export": {"opset": 17}}, "export.opset"),
    ({"export": {"quantized_tolerance": 0}}, "export.quantized_tolerance"),
    ({"data": {"holdout_fraction": 1}}, "data.holdout_fraction"),
    ({"data": {"synthetic_samples": 7}}, "data.synthetic_samples"),
    ({"overrides": [{"match": ""}]}, "overrides.0.match"),
    ({"overrides": [{"match": "a", "ratio": 0}]}, "overrides.0.ratio"),
    ({"version": 3}, "version"),
])
def test_a_bad_value_is_refused_naming_its_field(config, field):
    with pytest.raises(ConfigError) as refused:
        CompressionConfig.parse(config)
    assert _names_field(refused.value.message, field), refused.value.message


def test_a_bad_loss_kind_names_the_loss_and_its_output():
    # `loss` is one kind or a map of them: pydantic tags each union member in the path.
    with pytest.raises(ConfigError) as refused:
        CompressionConfig.parse({"finetune": {"loss": {"output_0": "hinge"}}})
    message = refused.value.message
    assert message.startswith("invalid config: finetune.loss.") and "output_0" in message, message


def test_every_bad_field_is_named_at_once():
    with pytest.raises(ConfigError) as refused:
        CompressionConfig.parse({"ratio": 2, "bogus": 1, "finetune": {"steps": -1}})
    for field in ("ratio", "bogus", "finetune.steps"):
        assert _names_field(refused.value.message, field), refused.value.message


def test_an_unknown_field_says_what_to_do():
    with pytest.raises(ConfigError, match="bogus: unknown field; remove it or check its spelling"):
        CompressionConfig.parse({"bogus": 1})


@pytest.mark.parametrize("body", ["{", "[]", "null", "3"])
def test_a_body_that_is_not_a_json_object_is_refused(body):
    with pytest.raises(ConfigError, match="^invalid config: config: "):
        CompressionConfig.parse(body)


# -- defaults and the JSON round trip ------------------------------------------------------------


@pytest.mark.parametrize("empty", [{}, "{}", "", None], ids=repr)
def test_an_empty_config_is_every_default(empty):
    config = CompressionConfig.parse(empty)
    assert config == CompressionConfig()
    assert config.version == CONFIG_VERSION
    assert config.method == method_class("lowrank").Options()
    assert config.overrides == [] and config.layers.include == ["*"]


ROUND_TRIPS = [
    {},
    {"method": {"name": "tie_rows", "groups": 7, "init": "kmeans"}, "ratio": 0.125,
     "layers": {"include": ["encoder.*"], "exclude": ["*.head"]},
     "overrides": [{"match": "encoder.0.*", "method": "share_values", "ratio": 0.3},
                   {"match": "encoder.1.*", "method": {"name": "lowrank", "rank": 3}},
                   {"match": "decoder.*", "skip": True}],
     "allocation": "uniform", "min_layer_params": 0, "timeout_s": 12.5,
     "finetune": {"steps": 0, "lr": 0.001, "loss": {"output_0": "embedding"},
                  "device": "cpu", "grad_reduction": "mean", "train_biases": True},
     "export": {"form": "factorized", "quantize": "int8", "opset": 20, "atol": 1e-6,
                "rtol": 0.0, "latency_seconds": 0},
     "data": {"holdout_fraction": 0.1, "synthetic_samples": 8, "max_length": 2}},
    {"init": "svd", "overrides": [{"match": "a", "rank": 4}]},  # version 1
    {"target": {"objective": "size", "top1_agreement": 0.9, "cosine": 0.995,
                "relative_l2": 0.1}, "ratio": 0.3},
    {"max_minutes": 12.5},
]


@pytest.mark.parametrize("given", ROUND_TRIPS)
def test_the_json_round_trip_is_exact(given):
    config = CompressionConfig.parse(given)
    text = config.to_json()
    again = CompressionConfig.parse(text)
    assert again == config
    assert again.to_json() == text  # byte for byte: nothing is re-defaulted or reordered
    assert CompressionConfig.parse(config.to_dict()) == config
    assert json.loads(text) == config.to_dict()
    # Every default is filled in: the JSON alone says what the job does.
    assert set(json.loads(text)) == set(CompressionConfig.model_fields)


def test_the_round_trip_keeps_a_non_default_value_of_every_top_level_section():
    configs = [CompressionConfig.parse(given) for given in ROUND_TRIPS]
    default = CompressionConfig()
    for field in CompressionConfig.model_fields:
        if field != "version":
            assert any(getattr(c, field) != getattr(default, field) for c in configs), field


# -- which mode a config runs in ------------------------------------------------------------------

@pytest.mark.parametrize("given", [
    {}, {"finetune": {"steps": 50}}, {"method": "lowrank"},
    {"method": {"name": "lowrank", "init": "svd"}}, {"export": {"int8_smoothing": None}},
    {"export": {"quantize": None}}, {"layers": {"exclude": ["classifier"]}},
    {"target": {"cosine": 0.995}, "ratio": 0.3},
])
def test_a_config_that_does_not_size_the_job_runs_target_mode(given):
    config = CompressionConfig.parse(given)
    assert config.target is not None
    assert config.target.cosine == given.get("target", {}).get("cosine", 0.99)


@pytest.mark.parametrize("given", [
    {"ratio": 0.3}, {"method": "tie_rows"}, {"method": {"name": "lowrank", "rank": 16}},
    {"overrides": [{"match": "fc*", "skip": True}]}, {"allocation": "uniform"},
    {"export": {"form": "dense"}}, {"export": {"quantize": "int8"}},
    {"export": {"quantize": "int4"}},
    {"export": {"quantize": "int8", "form": "factorized", "int8_smoothing": None},
     "finetune": {"quantization_aware": True}},
    {"target": None}, {"init": "svd"},  # version 1: no target mode then
])
def test_a_config_that_sizes_the_job_itself_compresses_to_its_ratio(given):
    config = CompressionConfig.parse(given)
    assert config.target is None
    assert config.ratio == given.get("ratio", RATIO_WITHOUT_TARGET)
    # What the service stores (every default filled) reads back in the same mode.
    assert CompressionConfig.parse(config.to_dict()).target is None


def test_target_mode_read_back_from_its_stored_form_stays_target_mode():
    stored = CompressionConfig.parse({}).to_dict()
    assert stored["ratio"] == RATIO_WITHOUT_TARGET  # present, yet the stored target wins
    assert CompressionConfig.parse(stored).target == TargetConfig()


def test_a_parsed_config_passes_through_parse_unchanged():
    config = CompressionConfig.parse({"ratio": 0.2})
    assert CompressionConfig.parse(config) is config


# -- method options against the registry ---------------------------------------------------------


@pytest.mark.parametrize("name", available_methods())
def test_every_registered_method_is_a_valid_choice_by_name_or_options(name):
    options = method_class(name).Options()
    assert CompressionConfig.parse({"method": name}).method == options
    assert CompressionConfig.parse({"method": {"name": name}}).method == options
    override = CompressionConfig.parse({"overrides": [{"match": "a", "method": name}]})
    assert override.overrides[0].method == options
    assert type(CompressionConfig.parse({"method": name}).method) is method_class(name).Options


@pytest.mark.parametrize("name", available_methods())
def test_a_methods_options_are_checked_by_its_own_model(name):
    with pytest.raises(ConfigError) as refused:
        CompressionConfig.parse({"method": {"name": name, "bogus": 1}})
    assert _names_field(refused.value.message, f"method.{name}.bogus"), refused.value.message
    size_field = method_class(name).size_field
    if size_field is None:
        return
    with pytest.raises(ConfigError) as refused:  # every size is at least 1
        CompressionConfig.parse({"overrides": [{"match": "a",
                                                "method": {"name": name, size_field: 0}}]})
    assert _names_field(refused.value.message, f"overrides.0.method.{name}.{size_field}")
    with pytest.raises(ConfigError, match=re.escape(f"give at most one of ratio and "
                                                    f"method.{size_field}")):
        CompressionConfig.parse({"overrides": [
            {"match": "a", "ratio": 0.5, "method": {"name": name, size_field: 2}}]})


@pytest.mark.parametrize(("config", "field"), [
    ({"method": "prune"}, "method"),
    ({"method": {"name": "prune", "rank": 3}}, "method"),
    ({"overrides": [{"match": "a", "method": "prune"}]}, "overrides.0.method"),
    ({"method": "prune", "init": "svd"}, "method"),  # version 1
])
def test_an_unknown_method_is_refused_listing_every_registered_one(config, field):
    with pytest.raises(ConfigError) as refused:
        CompressionConfig.parse(config)
    message = refused.value.message
    assert _names_field(message, field), message
    choices = re.search(r"unknown method 'prune'; choose one of: ([\w, ]+)", message)
    assert choices, message
    assert choices[1].split(", ") == sorted(available_methods())


def test_a_method_without_a_name_is_refused_saying_so():
    with pytest.raises(ConfigError, match=re.escape("give the method's `name`")):
        CompressionConfig.parse({"method": {"rank": 3}})


# -- the time budget -----------------------------------------------------------------------------

@pytest.mark.parametrize(("given", "max_minutes", "timeout_s"), [
    ({}, 45, 3600),  # three quarters of the default timeout
    ({"timeout_s": 7200}, 90, 7200),  # ... or of the timeout given
    ({"max_minutes": None}, None, 3600),  # null: no budget at all
])
def test_a_job_budgets_three_quarters_of_its_timeout_unless_told_otherwise(given, max_minutes,
                                                                          timeout_s):
    config = CompressionConfig.parse(given)
    assert (config.max_minutes, config.timeout_s) == (max_minutes, timeout_s)
    assert CompressionConfig.parse(config.to_dict()) == config  # what the workers read


@pytest.mark.parametrize(("given", "timeout_s"), [
    ({"max_minutes": 20}, 3600),  # the default timeout already leaves room
    ({"max_minutes": 90}, 2 * 90 * 60),  # twice the budget when only the budget is given
    ({"max_minutes": 20, "timeout_s": 1300}, 1300),  # both given: as given
])
def test_a_budget_ends_before_the_timeout(given, timeout_s):
    config = CompressionConfig.parse(given)
    assert config.max_minutes == given["max_minutes"] and config.timeout_s == timeout_s
    assert CompressionConfig.parse(config.to_dict()) == config  # what the workers read


@pytest.mark.parametrize("given", [{"max_minutes": 20, "timeout_s": 1200},
                                   {"max_minutes": 61, "timeout_s": 3600}])
def test_a_budget_not_before_the_timeout_is_refused_saying_what_to_change(given):
    with pytest.raises(ConfigError) as raised:
        CompressionConfig.parse(given)
    message = raised.value.message
    assert f"max_minutes {given['max_minutes']:g}" in message
    assert f"timeout_s {given['timeout_s']:g}" in message
    assert "Raise timeout_s above" in message and "lower max_minutes below" in message


@pytest.mark.parametrize("bad", [0, -5, "soon", 7 * 24 * 60])
def test_a_bad_budget_is_refused_naming_the_field(bad):
    with pytest.raises(ConfigError, match="max_minutes"):
        CompressionConfig.parse({"max_minutes": bad})
