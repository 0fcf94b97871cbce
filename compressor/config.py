"""The job configuration: pydantic models with a sensible default for every field.

`{}` is a valid config. Unknown fields, wrong types and out-of-range values are rejected by
pydantic with a message naming the field; `CompressionConfig.parse` turns that into a
`ConfigError` for callers that do not speak pydantic.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from compressor.errors import ConfigError

CONFIG_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_method(name: str) -> str:
    from compressor.methods import available_methods

    if name not in available_methods():
        raise ValueError(
            f"unknown method {name!r}; choose one of: {', '.join(sorted(available_methods()))}"
        )
    return name


class LayerSelection(_Strict):
    """Which layers to compress, by glob on the module's dotted name (e.g. `encoder.*.dense`)."""

    include: list[str] = Field(default_factory=lambda: ["*"], examples=[["*"]],
                               description="globs of layers to compress")
    exclude: list[str] = Field(default_factory=list, examples=[["classifier"]],
                               description="globs of layers to leave dense")


class LayerOverride(_Strict):
    """Per-layer settings for the layers whose dotted name matches `match` (a glob).

    The first matching override wins. Give at most one of `rank` (lowrank), `groups` (tie_rows),
    `values` (share_values) or `ratio`; or `skip: true` to leave the layer dense.
    """

    match: str = Field(min_length=1, examples=["encoder.*.dense"],
                       description="glob on the layer's dotted module name")
    method: str | None = Field(default=None, examples=["share_values"],
                               description="method for these layers (default: the job's)")
    ratio: float | None = Field(default=None, gt=0, le=1,
                                description="these layers' own kept fraction")
    rank: int | None = Field(default=None, ge=1, description="lowrank: the rank")
    groups: int | None = Field(default=None, ge=1, description="tie_rows: the number of rows kept")
    values: int | None = Field(default=None, ge=2, le=65536,
                               description="share_values: the codebook size K")
    skip: bool = Field(default=False, description="leave these layers dense")

    _check = field_validator("method")(lambda cls, v: v if v is None else _check_method(v))

    @model_validator(mode="after")
    def _one_size(self) -> LayerOverride:
        given = [n for n in ("ratio", "rank", "groups", "values") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of ratio, rank, groups, values; got {given}")
        return self


OutputKindSetting = Literal["auto", "logits", "embedding", "regression"]


class FinetuneConfig(_Strict):
    """Distillation fine-tuning of the compact parameters θ (optionally also the biases)."""

    steps: int = Field(default=300, ge=0, le=1_000_000, description="optimizer steps; 0 skips")
    lr: float | None = Field(
        default=None, gt=0, le=1.0,
        description="peak AdamW learning rate for every tensor; null: `relative_lr` instead")
    relative_lr: float = Field(
        default=0.005, gt=0, le=1.0,
        description="when `lr` is null, each tensor's peak learning rate is this × the RMS of its "
        "values, so pretrained weights of any scale move by the same fraction")
    loss: OutputKindSetting | dict[str, OutputKindSetting] = Field(
        default="auto", examples=["auto", {"output_0": "embedding"}],
        description="how outputs are matched: auto (from the output's name and the graph), "
        "logits (KL + MSE), embedding (cosine + MSE), regression (MSE); one kind for all "
        "outputs or a map from ONNX output name to kind")
    batch_size: int = Field(default=32, ge=1, le=65536, description="samples per step")
    weight_decay: float = Field(default=0.0, ge=0, le=1.0, description="AdamW weight decay")
    warmup_steps: int = Field(default=10, ge=0, description="linear warm-up, then cosine decay")
    eval_every: int = Field(default=25, ge=1, description="steps between held-out evaluations")
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="auto: CUDA (bf16 autocast) when present, else the CPU")
    grad_reduction: Literal["sum", "mean"] = Field(
        default="sum",
        description="a tied parameter's gradient: the sum of its copies' gradients, or their mean",
    )
    train_biases: bool = Field(default=False,
                               description="also train the biases of the compressed layers")
    seed: int = Field(default=0, ge=0, description="seeds data splits, sampling and batches")


class ExportConfig(_Strict):
    """How the compressed model is materialized, exported to ONNX and verified."""

    form: Literal["dense", "factorized"] = Field(
        default="dense",
        description="dense: plain weights in the original graph; factorized: the compact form",
    )
    quantize: Literal["int8"] | None = Field(
        default=None,
        description="int8: quantize the exported weights to int8 (onnxruntime dynamic "
        "quantization, per channel), on either form")
    quantized_tolerance: float = Field(
        default=0.3, gt=0, le=1,
        description="with quantize: the largest relative L2 difference accepted between the "
        "int8 model and the compressed PyTorch model, per output")
    opset: int = Field(default=18, ge=18, le=23, description="ONNX opset version")
    atol: float = Field(default=1e-4, gt=0,
                        description="onnxruntime vs PyTorch: absolute tolerance")
    rtol: float = Field(default=1e-3, ge=0,
                        description="onnxruntime vs PyTorch: relative tolerance")
    latency_seconds: float = Field(
        default=1.0, ge=0, le=60,
        description="onnxruntime time spent on each latency figure of the report; 0 skips the "
        "baseline (the original model's ONNX export, size and latency)",
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
        description="Hugging Face checkpoints: tokens per sample; text is truncated to this and "
        "padded to its longest sample, sampled token ids are this long")


class CompressionConfig(_Strict):
    """One compression job."""

    version: Literal[1] = Field(default=CONFIG_VERSION, description="config format version")
    method: str = Field(default="lowrank", examples=["lowrank"],
                        description="compression method for every targeted layer")
    ratio: float = Field(
        default=0.5, gt=0, le=1, description="fraction of the targeted layers' weights kept"
    )
    layers: LayerSelection = Field(default_factory=LayerSelection)
    overrides: list[LayerOverride] = Field(default_factory=list)
    init: Literal["svd", "activation_aware", "sequential"] = Field(
        default="sequential",
        description="lowrank initialization: truncated SVD; activation_aware (whitened by each "
        "layer's calibration inputs); sequential (activation_aware, then each layer's second "
        "factor re-solved on the inputs the compressed model gives it). The tying methods "
        "start from k-means",
    )
    allocation: Literal["sensitivity", "uniform"] = Field(
        default="sensitivity",
        description="lowrank: spread the budget across layers by each layer's measured "
        "sensitivity (ranks in multiples of 8), or give every layer the same kept fraction")
    per_output_scale: bool = Field(
        default=True, description="tie_inputs: give each output row a learned scale"
    )
    min_layer_params: int = Field(
        default=1024, ge=0, description="layers with fewer weights than this stay dense"
    )
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    timeout_s: float = Field(default=3600, gt=0, le=7 * 24 * 3600,
                             description="the job fails with code `timeout` past this")

    _check = field_validator("method")(lambda cls, v: _check_method(v))

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


def describe_validation_error(exc: ValidationError) -> str:
    """Return one line per problem: `field.path: what is wrong`."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field; remove it or check its spelling"
        elif err["type"] == "json_invalid":
            msg = f"not valid JSON ({err.get('ctx', {}).get('error', msg)})"
        lines.append(f"{where}: {msg}")
    return "invalid config: " + "; ".join(lines)
