"""Planning: one global ratio budget, globs, overrides, dense fallbacks, clear errors."""

import pytest

from compressor.config import CompressionConfig
from compressor.errors import ConfigError
from compressor.methods import LayerInfo, available_methods, method_class
from compressor.plan.layers import SkippedLayer
from compressor.plan.planning import plan_layers

LAYERS = [
    LayerInfo("encoder.0.query", "linear", (128, 128), True),
    LayerInfo("encoder.0.mlp", "linear", (512, 128), True),
    LayerInfo("encoder.1.query", "linear", (128, 128), True),
    LayerInfo("stem", "conv2d", (32, 3, 3, 3), True, padding=(1, 1)),
    LayerInfo("tiny", "linear", (4, 8), True),
    LayerInfo("head", "linear", (10, 128), True),
]


def plan(**config):
    return plan_layers(LAYERS, [], CompressionConfig.parse(config))


def sizes(result):
    return {p.layer.name: p.size for p in result.layers}


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.25, 0.1])
def test_the_plan_fits_the_global_budget(ratio):
    result = plan(ratio=ratio)
    assert result.kept_numel <= ratio * result.targeted_numel
    # Tight: one more rank on the largest layer would break the budget.
    assert result.kept_numel > ratio * result.targeted_numel - (512 + 128)


def test_layers_below_min_layer_params_are_left_alone():
    result = plan()
    assert "tiny" not in sizes(result)
    assert any(s.name == "tiny" and "min_layer_params" in s.reason for s in result.skipped)


def test_layers_where_the_method_saves_nothing_stay_dense_and_count_in_the_budget():
    score = LayerInfo("score", "linear", (1, 2048), True)  # rank 1 costs 2049 > 2048 weights
    result = plan_layers([*LAYERS, score], [], CompressionConfig(ratio=0.5))
    planned = next(p for p in result.layers if p.layer.name == "score")
    assert planned.size is None and planned.compact_numel == 2048
    assert "saves nothing" in planned.reason
    assert result.kept_numel <= 0.5 * result.targeted_numel
    assert result.to_dict()["layers"][-1]["method"] == "dense"


def test_include_and_exclude_globs():
    result = plan(layers={"include": ["encoder.*"], "exclude": ["*.mlp"]})
    assert set(sizes(result)) == {"encoder.0.query", "encoder.1.query"}


def test_an_override_fixes_the_rank_and_the_rest_share_what_remains():
    result = plan(ratio=0.5, overrides=[{"match": "encoder.*.query", "rank": 4}])
    assert sizes(result)["encoder.0.query"] == 4 and sizes(result)["encoder.1.query"] == 4
    assert result.kept_numel <= 0.5 * result.targeted_numel
    assert sizes(result)["encoder.0.mlp"] > plan(ratio=0.5).layers[1].size


def test_override_skip_leaves_a_layer_dense_and_outside_the_budget():
    result = plan(overrides=[{"match": "stem", "skip": True}])
    assert "stem" not in sizes(result)


def test_the_first_matching_override_wins():
    result = plan(overrides=[{"match": "encoder.0.*", "rank": 2}, {"match": "encoder.*", "rank": 3}])
    assert sizes(result)["encoder.0.query"] == 2 and sizes(result)["encoder.1.query"] == 3


@pytest.mark.parametrize(
    "config,message",
    [
        ({"overrides": [{"match": "encodr.*", "rank": 4}]}, "matches no compressible layer"),
        ({"overrides": [{"match": "stem", "groups": 4}]}, "takes rank"),
        ({"layers": {"include": ["nothing*"]}}, "no layer is targeted"),
    ],
)
def test_bad_plans_say_what_to_fix(config, message):
    with pytest.raises(ConfigError, match=message):
        plan(**config)


def test_a_model_without_linear_or_conv_layers_is_refused_clearly():
    with pytest.raises(ConfigError, match="has no layer to compress; this service compresses Linear"):
        plan_layers([], [], CompressionConfig())


def test_skipped_layers_from_the_graph_are_reported():
    skipped = [SkippedLayer("emb", "its weight is shared with other operations")]
    result = plan_layers(LAYERS, skipped, CompressionConfig())
    assert result.to_dict()["skipped"][0] == {"name": "emb",
                                              "reason": "its weight is shared with other operations"}


@pytest.mark.parametrize(
    "config,field",
    [
        ({"ratio": 0}, "ratio"),
        ({"ratio": 1.5}, "ratio"),
        ({"method": "prune"}, "method"),
        ({"finetune": {"lr": -1}}, "finetune.lr"),
        ({"finetune": {"grad_reduction": "max"}}, "finetune.grad_reduction"),
        ({"export": {"form": "sparse"}}, "export.form"),
        ({"bogus": 1}, "bogus"),
        ({"overrides": [{"match": "x", "rank": 2, "groups": 3}]}, "overrides.0"),
    ],
)
def test_config_errors_name_the_field(config, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        CompressionConfig.parse(config)


def test_an_empty_config_is_valid_and_round_trips():
    config = CompressionConfig.parse("{}")
    assert CompressionConfig.parse(config.to_json()) == config


@pytest.mark.parametrize("method", [name for name in available_methods()
                                    if method_class(name).ties_output_rows])
def test_tying_methods_leave_a_layer_that_produces_an_output_dense(method):
    head = LayerInfo("classifier", "linear", (10, 256), True, produces_output=True)
    layers = [LayerInfo("body", "linear", (256, 256), True), head]
    result = plan_layers(layers, [], CompressionConfig(method=method))
    assert "classifier" not in sizes(result)
    assert any(s.name == "classifier" and "outputs identical" in s.reason for s in result.skipped)
    forced = plan_layers(layers, [], CompressionConfig(
        method=method, overrides=[{"match": "classifier", "method": method}]))
    assert sizes(forced)["classifier"] is not None
    # Methods that keep every output row distinct still compress it.
    distinct = [name for name in available_methods() if not method_class(name).ties_output_rows
                and "linear" in method_class(name).layer_kinds]
    assert distinct
    for other in distinct:
        assert sizes(plan_layers(layers, [], CompressionConfig(method=other)))["classifier"]


def test_find_layers_marks_the_layers_that_produce_an_output(tmp_path):
    import torch

    from compressor.plan.layers import find_layers
    from tests.support.tiny_models import make_pt2

    program = torch.export.load(str(make_pt2("text", tmp_path / "text.pt2")))
    layers, _ = find_layers(program.module())
    assert [layer.name for layer in layers if layer.produces_output] == ["classifier"]
