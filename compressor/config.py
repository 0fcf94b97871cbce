"""The job configuration: pydantic models with a sensible default for every field.

`{}` is a valid config. Unknown fields, wrong types and out-of-range values are rejected by
pydantic with a message naming the field; `CompressionConfig.parse` turns that into a
`ConfigError` for callers that do not speak pydantic.

The method is the unit of configuration: `method` (and an override's `method`) is one of the
registered methods' options models, told apart by `name` (`"lowrank"` alone means its
defaults), e.g. `{"name": "lowrank", "rank": 64, "init": "svd"}`. Version-1 configs (a top-level
`init` and `per_output_scale`, sizes as override fields) are read and upgraded to version 2.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from compressor.errors import ConfigError
from compressor.methods import (
    MethodOptions,
    available_methods,
    method_class,
    options_types,
    unknown_method_message,
)
from compressor.runtime.budget import LATENCY_LONGEST_MULTIPLE, LATENCY_MIN_RUNS
from compressor.runtime.outputs import judged_figure
from compressor.vocabulary import describe_validation_error

CONFIG_VERSION = 2
# The kept fraction of a job that sizes itself without giving `ratio` (see `with_mode_chosen`).
RATIO_WITHOUT_TARGET = 0.5
DEFAULT_TIMEOUT_S = 3600
MAX_TIMEOUT_S = 7 * 24 * 3600
# A job that gives no `max_minutes` budgets this share of its `timeout_s`: one that would run
# past the timeout (a 135M-parameter language model's default job on 2 cores: the search, then
# 300 fine-tuning steps of tens of seconds) stops its search and fine-tuning in time and hands
# back a verified model, where it failed with `timeout` and nothing to show; the rest of the
# timeout covers what the budget's estimates miss (Gemma-3 270M's 45-minute job: 94 s over).
BUDGET_SHARE_OF_TIMEOUT = 0.75


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _named_method(value: Any) -> Any:
    """Accept a method's bare name as its default options; check the name against the registry."""
    if isinstance(value, MethodOptions):
        return value
    if isinstance(value, str):
        value = {"name": value}
    if isinstance(value, dict):
        if "name" not in value:
            raise ValueError("give the method's `name`, e.g. {\"name\": \"lowrank\", \"rank\": 64}")
        if value["name"] not in available_methods():
            raise ValueError(unknown_method_message(value["name"]))
    return value


# One of the registered methods' options, chosen by `name`; a bare name means its defaults.
MethodChoice = Annotated[
    Annotated[Union[options_types()], Field(discriminator="name")],  # noqa: UP007
    BeforeValidator(_named_method),
]


class LayerSelection(_Strict):
    """Which layers to compress, by glob on the module's dotted name (e.g. `encoder.*.dense`)."""

    include: list[str] = Field(default_factory=lambda: ["*"], examples=[["*"]],
                               description="globs of layers to compress")
    exclude: list[str] = Field(default_factory=list, examples=[["classifier"]],
                               description="globs of layers to leave dense")


class LayerOverride(_Strict):
    """Per-layer settings for the layers whose dotted name matches `match` (a glob).

    The first matching override wins. `method` configures these layers' method, its size
    included (`{"name": "lowrank", "rank": 64}`); `ratio` gives them their own kept fraction
    instead of a size; `skip: true` leaves them dense.
    """

    match: str = Field(min_length=1, examples=["encoder.*.dense"],
                       description="glob on the layer's dotted module name")
    method: MethodChoice | None = Field(
        default=None, examples=["share_values", {"name": "lowrank", "rank": 64}],
        description="method (and its options) for these layers; null: the job's")
    ratio: float | None = Field(default=None, gt=0, le=1,
                                description="these layers' own kept fraction")
    skip: bool = Field(default=False, description="leave these layers dense")

    @model_validator(mode="after")
    def _one_size(self) -> LayerOverride:
        if self.ratio is not None and self.method is not None:
            size_field = method_class(self.method.name).size_field
            if size_field is not None and getattr(self.method, size_field) is not None:
                raise ValueError(f"give at most one of ratio and method.{size_field}")
        return self


OutputKindSetting = Literal["auto", "logits", "embedding", "regression"]


class FinetuneConfig(_Strict):
    """Distillation fine-tuning of the compact parameters θ (optionally also the biases)."""

    steps: int = Field(
        default=300, ge=0, le=1_000_000,
        description="optimizer steps; 0 skips. Target mode: the most a finalist takes, ending "
        "once it keeps the floor")
    lr: float | None = Field(
        default=None, gt=0, le=1.0,
        description="peak AdamW learning rate for every tensor; null: `relative_lr` instead")
    relative_lr: Annotated[float, Field(gt=0, le=1.0)] | Literal["auto"] = Field(
        default="auto", examples=["auto", 0.005],
        description="when `lr` is null, each tensor's peak learning rate is this × the RMS of its "
        "values, so pretrained weights of any scale move by the same fraction; auto: 0.005, and "
        "0.0003 for a causal language model (Gemma-3 270M blew up within 25 steps at 0.005 and "
        "learned at 0.0003)")
    loss: OutputKindSetting | dict[str, OutputKindSetting] = Field(
        default="auto", examples=["auto", {"output_0": "embedding"}],
        description="how outputs are matched: auto (from the output's name and the graph), "
        "logits (KL + MSE), embedding (cosine + MSE), regression (MSE); one kind for all "
        "outputs or a map from ONNX output name to kind")
    batch_size: int = Field(default=32, ge=1, le=65536, description="samples per step")
    tokens_per_step: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        default="auto", examples=["auto", 4096, None],
        description="for text (an input_ids input), a step takes at most this many tokens: "
        "fewer samples than batch_size when its windows are long (a 135M language model's step "
        "of 32 × 128 tokens is several TFLOP, minutes on a CPU); auto: 1,024 on the CPU, no "
        "limit on CUDA; null: no limit")
    logits_top_k: Annotated[int, Field(ge=1, le=65536)] | Literal["auto"] | None = Field(
        default="auto", examples=["auto", 64, None],
        description="a language model's next-token logits are distilled on the original's k "
        "most likely tokens per position plus one bucket for all the others: the KL divergence "
        "over those (no MSE of every logit), with the original's top k kept once per training "
        "sample so it does not run again at every step; auto: 64 when the vocabulary has more "
        "than 1,024 tokens; null: the whole vocabulary (KL + MSE), the original run every step "
        "when its outputs on the training split take more than 512 MiB")
    distill: Literal["outputs", "blocks"] = Field(
        default="outputs",
        description="what a step's loss compares: outputs, the model's outputs with the "
        "original's (a language model's next-token distribution); blocks, each repeated block "
        "(layers.0, layers.1, ...) run on the original's input to it against the original "
        "block's output, so a step forms no logits (a language model's head is most of a "
        "step's work) and only the layers inside blocks learn; the held-out score that keeps "
        "the best θ is the outputs' either way. A model without repeated blocks, and a "
        "quantization-aware run, distill on the outputs")
    weight_decay: float = Field(default=0.0, ge=0, le=1.0, description="AdamW weight decay")
    warmup_steps: int = Field(default=10, ge=0, description="linear warm-up, then cosine "
                              "decay; the warm-up again after a held-out roll-back")
    eval_every: int = Field(default=25, ge=1, description="steps between held-out evaluations")
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="auto: CUDA (bf16 autocast) when present, else the CPU")
    grad_reduction: Literal["sum", "mean"] = Field(
        default="sum",
        description="a tied parameter's gradient: the sum of its copies' gradients, or their mean",
    )
    train_biases: bool = Field(default=False,
                               description="also train the biases of the compressed layers")
    activation_checkpointing: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="run each repeated block (layers.0, layers.1, ...) under activation "
        "checkpointing, so a step keeps block inputs only and recomputes the rest in the "
        "backward pass; auto: when a step's activations, measured on one sample, would not fit "
        "in half the device's free memory")
    quantization_aware: bool = Field(
        default=False,
        description="fine-tune through onnxruntime's int8 arithmetic, simulated (weights and "
        "activations fake-quantized, gradients straight through), so θ learns to keep the "
        "fidelity int8 costs, smoothed as export.int8_smoothing will smooth it; needs "
        "export.quantize 'int8' and export.form 'factorized'. Target mode decides it for each int8 "
        "finalist itself: through int8 when unsmoothed, or when what int8 costs it is beyond "
        "float fine-tuning's reach of the floor; in float otherwise")
    seed: int = Field(default=0, ge=0, description="seeds data splits, sampling and batches")
    checkpoint_every: int = Field(
        default=100, ge=0,
        description="steps between fine-tuning checkpoints kept in the job's folder (resume/), "
        "from which a retried job goes on; 0: keep none")
    checkpoint_minutes: float = Field(
        default=10, gt=0,
        description="a checkpoint is also written when this many minutes passed since the last")


class ExportConfig(_Strict):
    """How the compressed model is materialized, exported to ONNX and verified."""

    form: Literal["dense", "factorized"] = Field(
        default="dense",
        description="dense: plain weights in the original graph; factorized: the compact form",
    )
    quantize: Literal["int8", "int4"] | None = Field(
        default=None,
        description="int8: quantize the exported weights to int8 (onnxruntime dynamic "
        "quantization, per channel; activations int8 at run time; an embedding table only its "
        "lookup reads in 4-bit blocks of 32, which costs a lookup no time); int4: weight-only 4-bit "
        "(onnxruntime MatMulNBits, blocks of 32 inputs; MatMul weights and embedding tables, "
        "activations stay float: a smaller file, not faster arithmetic; convolutions stay "
        "float). On either form")
    int8_smoothing: float | None = Field(
        default=0.5, ge=0, le=1,
        description="with quantize 'int8': move the activations' outlier channels into the weights "
        "before int8 (each MatMul input channel divided by (max|x| / the median channel's)^α, "
        "the weight's column multiplied by it) on each input where that cuts its MatMuls' "
        "simulated int8 error to 0.7 of itself or less; null: quantize as is")
    quantized_tolerance: float = Field(
        default=0.3, gt=0, le=1,
        description="with quantize: the largest relative L2 difference accepted between the "
        "quantized model and the compressed PyTorch model, per output (int8 costs MiniLM 0.13, "
        "int4 0.23; target mode judges its quantized model by the target's floors instead)")
    opset: int = Field(
        default=20, ge=18, le=23,
        description="ONNX opset version (from 20, GELU is one Gelu node, which onnxruntime "
        "runs as one kernel: MiniLM's int8 7-9 % faster at batch 32 than at 18)")
    atol: float = Field(
        default=1e-4, gt=0,
        description="onnxruntime vs PyTorch: absolute tolerance, the floor of every output's "
        "tolerance (atol + rtol·|value| + noise_multiple × the output's float32 noise floor)")
    rtol: float = Field(
        default=1e-3, ge=0,
        description="onnxruntime vs PyTorch: relative tolerance (rtol·|value| is added to "
        "atol)")
    noise_multiple: float = Field(
        default=8, ge=0,
        description="onnxruntime vs PyTorch: how many times an output's float32 noise floor is "
        "added to atol + rtol·|value| (the noise floor: the largest |difference| between the "
        "model in float32 and in float64, or perturbed float32 where float64 does not fit, on "
        "the verified samples; it grows with depth and magnitude: a deep model's rounding is "
        "not a bug); 0: atol and rtol alone")
    latency_seconds: float = Field(
        default=1.0, ge=0, le=60,
        description="onnxruntime time spent on each latency figure of the report, at least: a "
        f"figure's runs go on until each file has {LATENCY_MIN_RUNS}, unless that takes "
        f"{LATENCY_LONGEST_MULTIPLE} times as long; 0 "
        "skips the baseline (the original model's ONNX export, size and latency)",
    )


class DataConfig(_Strict):
    """How the job's inputs are split, or sampled when no data file is given."""

    holdout_fraction: float = Field(default=0.2, gt=0, lt=1,
                                    description="share of samples held out for evaluation")
    synthetic_samples: int = Field(
        default=256, ge=8, le=100_000, description="samples drawn when no data file is given"
    )
    max_samples: int = Field(default=100_000, ge=8, description="rows of a data file used")
    max_length: int = Field(
        default=128, ge=2, le=8192,
        description="Hugging Face checkpoints: tokens per sample; a causal LM's text is cut into "
        "windows this long (every token counts), any other model's truncated to it; padded to "
        "the longest sample; sampled token ids are this long")


class TargetConfig(_Strict):
    """Target mode: the fidelity the compressed model must keep, per output kind, and what to
    make as small as possible while keeping it."""

    objective: Literal["size", "latency"] = Field(
        default="size",
        description="size: the smallest artifact (bytes of its ONNX file) that meets every "
        "floor; latency: the fastest (onnxruntime CPU latency at `latency_batch`, measured on "
        "each candidate that meets the floors or is within fine-tuning's reach of them; its "
        "candidates are cut by multiply-adds, not stored numbers, embedding tables stay "
        "dense, and each compressed Linear is exported factorized only where onnxruntime was "
        "measured to run that faster than its dense weight)")
    latency_batch: int = Field(
        default=32, ge=1, le=4096,
        description="the batch size candidates' latency is measured at: objective latency's, "
        "and objective size's between candidates within 2 % of the smallest's bytes (batch 1 "
        "when one run at this batch would cost too much compute or memory)")
    top1_agreement: float = Field(
        default=0.99, ge=0, le=1,
        description="logits (a language model's next-token logits are judged by "
        "perplexity_ratio instead): the least share of samples (positions) whose top-1 class "
        "agrees with the original's")
    cosine: float = Field(
        default=0.99, ge=-1, le=1,
        description="embeddings: the least mean cosine similarity to the original's vectors")
    relative_l2: float = Field(
        default=0.05, gt=0,
        description="other outputs: the most relative L2 difference from the original's")
    perplexity_ratio: float = Field(
        default=1.05, ge=1,
        description="a causal language model's next-token logits (judged by this instead of "
        "top1_agreement): the most its held-out perplexity may be, as a multiple of the "
        "original's (1.05: at most 5 % higher)")

    def floors(self) -> dict[str, float]:
        """Return the floor of each judged figure, by figure."""
        return {"top1_agreement": self.top1_agreement, "cosine": self.cosine,
                "relative_l2": self.relative_l2, "perplexity_ratio": self.perplexity_ratio}

    def margin(self, figures: dict[str, Any]) -> float:
        """How far one output's judged figure (`judged_figure`: a language model's next-token
        logits by perplexity, other logits by top-1 agreement, embeddings by cosine, any other
        float output by relative L2) is on the right side of its floor (negative: on the wrong
        side; an output judged by nothing: inf)."""
        judged = judged_figure(figures)
        if judged is None:
            return float("inf")
        figure, value, lower_is_better = judged
        floor = self.floors()[figure]
        return floor - value if lower_is_better else value - floor

    def met_by(self, fidelity: dict[str, dict[str, Any]]) -> bool:
        """Whether every output's figures (by output name) keep their kind's floor."""
        return all(self.margin(figures) >= 0 for figures in fidelity.values())


class CompressionConfig(_Strict):
    """One compression job."""

    version: Literal[2] = Field(
        default=CONFIG_VERSION,
        description="config format version; version-1 configs are read and upgraded")
    method: MethodChoice = Field(
        default_factory=lambda: method_class("lowrank").Options(),
        examples=["lowrank", {"name": "tie_rows", "init": "kmeans"}],
        description="compression method (and its options) for every targeted layer")
    ratio: float = Field(
        default=RATIO_WITHOUT_TARGET, gt=0, le=1,
        description="fraction of the targeted layers' weights kept (an expert setting: giving "
        "it turns target mode off unless `target` is given too)")
    target: TargetConfig | None = Field(
        default_factory=TargetConfig, examples=[{}, {"cosine": 0.995}, None],
        description="target mode, the default: the smallest model (lowrank, compact form, int8 "
        "or int4 stacked where it pays) whose held-out fidelity meets every floor; `{}` uses the "
        "default floors; `ratio`, if given too, is then only where the sensitivities are "
        "measured, and export.form is chosen (factorized). null: compress to `ratio`. When "
        "`target` is not given, a config that sizes the job itself (`ratio`, `overrides`, a "
        "method other than lowrank or lowrank's `rank`, `allocation` 'uniform', "
        "`export.form`, `export.quantize`, `finetune.quantization_aware`, or a version-1 "
        "config) compresses to `ratio` (0.5 unless given); any other runs target mode")
    layers: LayerSelection = Field(default_factory=LayerSelection)
    overrides: list[LayerOverride] = Field(default_factory=list)
    allocation: Literal["sensitivity", "uniform"] = Field(
        default="sensitivity",
        description="lowrank: spread the budget across layers by each layer's measured "
        "sensitivity (ranks in multiples of 8), or give every layer the same kept fraction")
    min_layer_params: int = Field(
        default=1024, ge=0, description="layers with fewer weights than this stay dense"
    )
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    timeout_s: float = Field(
        default=DEFAULT_TIMEOUT_S, gt=0, le=MAX_TIMEOUT_S,
        description="the job fails with code `timeout` past this; when only `max_minutes` is "
        "given, twice the budget (at least 3600)")
    max_minutes: float | None = Field(
        default=None, gt=0, lt=7 * 24 * 60, examples=[None, 20],
        json_schema_extra={"default_text": "¾ of `timeout_s`"},
        description="a time budget: the job ends within about this many minutes with the best "
        "verified model it can make in them. Calibration takes fewer samples, target mode's "
        "search scores fewer candidates and fine-tunes fewer finalists, fine-tuning stops "
        "before its last step, each keeping time for export, verification and the report; "
        "report.json's `budget` lists what was cut. Must end before `timeout_s`. When not "
        "given: three quarters of `timeout_s` (45 with the default timeout), so a job that "
        "would run past its timeout hands back what it made in time instead of failing; a job "
        "that fits in it is not cut. null: no budget, nothing is ever cut, the same config "
        "gives the same model on any machine (and a job too long for `timeout_s` fails)")

    @model_validator(mode="before")
    @classmethod
    def _read_version_1_and_choose_mode(cls, data: Any) -> Any:
        upgraded = upgrade_version_1(data)
        return with_budget_and_timeout(with_mode_chosen(upgraded,
                                                        was_version_1=upgraded is not data))

    @model_validator(mode="after")
    def _one_way_to_size(self) -> CompressionConfig:
        # Checks on values, not on which fields were given: a config with its defaults filled
        # (what the service stores and its workers read) must parse as it did.
        if self.target is not None:
            if self.overrides:
                raise ValueError("give either `target` or `overrides`: target mode chooses "
                                 "every layer's size itself")
            if self.export.quantize is not None:
                raise ValueError("target mode chooses export.quantize itself; remove it, or "
                                 "give `ratio` instead of `target`")
            if self.finetune.quantization_aware:
                raise ValueError("target mode fine-tunes its int8 candidates quantization-aware "
                                 "itself; remove finetune.quantization_aware")
        elif self.finetune.quantization_aware and (self.export.quantize != "int8"
                                                   or self.export.form != "factorized"):
            raise ValueError("finetune.quantization_aware simulates the int8 compact form: set "
                             "export.quantize 'int8' and export.form 'factorized', or remove it")
        if self.max_minutes is not None and self.max_minutes * 60 >= self.timeout_s:
            raise ValueError(
                f"max_minutes {self.max_minutes:g} ({self.max_minutes * 60:g} s) must end before "
                f"timeout_s {self.timeout_s:g}: the budget is where the job stops itself with "
                "a result, the timeout where it fails. Raise timeout_s above "
                f"{self.max_minutes * 60:g} (or leave it out: twice the budget), or lower "
                f"max_minutes below {self.timeout_s / 60:g}")
        return self

    @classmethod
    def parse(cls, value: CompressionConfig | dict[str, Any] | str | None) -> CompressionConfig:
        """Build a config from a model, a dict, a JSON string or None (all defaults).

        Raises `ConfigError` naming every offending field.
        """
        if isinstance(value, CompressionConfig):
            return value
        if value is None:
            return cls()
        try:
            if isinstance(value, str):
                return cls.model_validate_json(value or "{}")
            return cls.model_validate(value)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc)) from None

    def to_json(self) -> str:
        """Return the config with every default filled, as JSON."""
        return self.model_dump_json()

    def to_dict(self) -> dict[str, Any]:
        """Return the config with every default filled, as plain data."""
        return json.loads(self.to_json())


def with_mode_chosen(data: Any, *, was_version_1: bool = False) -> Any:
    """Return a config (plain data) with `target` stated: as given, or null when the config sizes
    the job itself, or absent (target mode with the default floors) otherwise.

    A config sizes the job itself when it gives `ratio`, `overrides`, a method other than
    lowrank (or lowrank's `rank`), `allocation` 'uniform', `export.form`, `export.quantize` or
    `finetune.quantization_aware`, or is a version-1 config: each is a choice target mode makes
    for the user, so a config making it asks for what it says (`ratio` 0.5 unless given).
    """
    if not isinstance(data, dict) or "target" in data:
        return data
    if was_version_1 or _sizes_the_job(data):
        return {**data, "target": None}
    return data


def with_budget_and_timeout(data: Any) -> Any:
    """Return a config (plain data) with both `max_minutes` and `timeout_s` settled: a budget
    not given (absent, not null) is `BUDGET_SHARE_OF_TIMEOUT` of the timeout (given or
    default); a timeout not given beside a budget is twice the budget (at least the default,
    at most its maximum), so a budget past an hour does not need a timeout too. Invalid values
    are left for validation to name."""
    if not isinstance(data, dict):
        return data
    if "max_minutes" not in data:
        timeout = data.get("timeout_s", DEFAULT_TIMEOUT_S)
        if not _positive_number(timeout) or timeout > MAX_TIMEOUT_S:
            return data
        return {**data, "max_minutes": BUDGET_SHARE_OF_TIMEOUT * timeout / 60}
    budget = data["max_minutes"]
    if "timeout_s" in data or not _positive_number(budget):
        return data  # both given, or no budget (null), or an invalid one
    return {**data, "timeout_s": min(MAX_TIMEOUT_S, max(DEFAULT_TIMEOUT_S, 2 * 60 * budget))}


def _positive_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def _sizes_the_job(data: dict[str, Any]) -> bool:
    method = data.get("method")
    if isinstance(method, dict):
        other_method = method.get("name") != "lowrank" or method.get("rank") is not None
    else:
        other_method = method is not None and method != "lowrank"
    export = data.get("export") if isinstance(data.get("export"), dict) else {}
    finetune = data.get("finetune") if isinstance(data.get("finetune"), dict) else {}
    return ("ratio" in data or bool(data.get("overrides")) or other_method
            or data.get("allocation") == "uniform" or "form" in export
            or export.get("quantize") is not None
            or bool(finetune.get("quantization_aware")))


# Top-level fields of version 1 that became method options in version 2.
_V1_FIELDS = ("init", "per_output_scale")
_V1_SIZES = ("rank", "groups", "values")


def upgrade_version_1(data: Any) -> Any:
    """Return a version-1 config (plain data) as version 2; anything else unchanged.

    Version 1 had a job-wide `init` (lowrank's initialization; tie_rows whitened unless it was
    `svd`) and `per_output_scale` (tie_inputs), and overrides set `rank` / `groups` / `values`
    themselves. A config without `version` is version 1 when it uses any of these.
    """
    if not isinstance(data, dict):
        return data
    overrides = data.get("overrides")
    overrides = overrides if isinstance(overrides, list) else []
    uses_v1 = (any(f in data for f in _V1_FIELDS)
               or any(isinstance(o, dict) and any(s in o for s in _V1_SIZES) for o in overrides))
    if data.get("version", 1 if uses_v1 else CONFIG_VERSION) != 1:
        return data
    data = dict(data)
    legacy = {f: data.pop(f) for f in _V1_FIELDS if f in data}
    job_method = data.get("method", "lowrank")
    data["method"] = _v1_method(job_method, legacy)
    data["overrides"] = [_v1_override(i, o, job_method, legacy) for i, o in enumerate(overrides)]
    data["version"] = CONFIG_VERSION
    return data


def _v1_method_options(name: str, legacy: dict[str, Any], **size: Any) -> dict[str, Any] | str:
    if name not in available_methods():
        return name  # validation names it as unknown
    options: dict[str, Any] = {"name": name, **size}
    if name == "lowrank" and "init" in legacy:
        options["init"] = legacy["init"]
    elif name == "tie_rows" and "init" in legacy:
        options["init"] = "kmeans" if legacy["init"] == "svd" else "activation_aware"
    elif name == "tie_inputs" and "per_output_scale" in legacy:
        options["per_output_scale"] = legacy["per_output_scale"]
    return options


def _v1_override(index: int, override: Any, job_method: Any, legacy: dict[str, Any]) -> Any:
    if not isinstance(override, dict):
        return override
    override = dict(override)
    size = {f: override.pop(f) for f in _V1_SIZES if override.get(f) is not None}
    for field in _V1_SIZES:
        override.pop(field, None)
    given = [*size, *(["ratio"] if override.get("ratio") is not None else [])]
    if len(given) > 1:
        raise ValueError(f"overrides.{index}: give at most one of ratio, rank, groups, values; "
                         f"got {given}")
    method = override.get("method") or (job_method if size else None)
    name = method.get("name") if isinstance(method, dict) else method
    if isinstance(name, str) and name in available_methods():
        expected = method_class(name).size_field
        wrong = [f for f in size if f != expected]
        if wrong:
            raise ValueError(
                f"overrides.{index}: override {override.get('match')!r} sets `{wrong[0]}` but its "
                f"method {name!r} "
                f"takes {expected or 'no size (its size is fixed)'}; fix the override")
    if method is not None:
        override["method"] = _v1_method(method, legacy, **size)
    return override


def _v1_method(method: Any, legacy: dict[str, Any], **size: Any) -> Any:
    """Return a v1 method (a name, or options already) as v2 options carrying the legacy
    fields and the size that go with it; options given explicitly win."""
    if isinstance(method, str):
        return _v1_method_options(method, legacy, **size)
    if isinstance(method, dict) and method.get("name") in available_methods():
        return {**_v1_method_options(method["name"], legacy, **size), **method}
    return method

