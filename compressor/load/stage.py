"""The loading stage: the upload, safely, as a program to compress, with its data and its costs.

A `.pt2` program or a Hugging Face folder (or an archive of one) becomes the original model the
later stages read (`teacher`), the job's data split into training and held-out parts, what
each output is (its ONNX name and kind, which decide its loss and how it is scored) and what one
sample of the model costs (`SampleCosts`, which sizes every later stage's batches).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import fx
from torch.export import ExportedProgram
from torch.utils._pytree import tree_leaves

from compressor.config import CompressionConfig
from compressor.errors import ResourceError
from compressor.export.onnx import onnx_output_names
from compressor.load import huggingface
from compressor.load.data import Dataset, InputSpec, input_specs, load_data, synthesize_data
from compressor.load.guards import check_guards
from compressor.load.huggingface import LoadedCheckpoint
from compressor.load.program import load_program
from compressor.methods import method_class
from compressor.runtime.costs import SampleCosts
from compressor.runtime.graph import shallow_copy
from compressor.runtime.joblog import JobLog
from compressor.runtime.memory import (
    BASE_PEAK_BYTES,
    PEAK_PER_MODEL_BYTE,
    available_memory_bytes,
    format_bytes,
    loaded_weight_bytes,
    model_memory_estimate,
)
from compressor.runtime.objectives import detect_output_kinds
from compressor.runtime.outputs import call
from compressor.runtime.progress import JobControl
from compressor.runtime.resume import free_disk_bytes, kept_bytes_estimate
from compressor.vocabulary import LOADING

# The artifacts (model.onnx, a Hugging Face folder's copy, ...) take about the weights again.
ARTIFACT_BYTES_PER_WEIGHT_BYTE = 2


@dataclass
class LoadedJob:
    """A job's model and data, ready for planning.

    `teacher` is the original as a GraphModule sharing the program's tensors (nothing writes to
    them); it and `checkpoint` are dropped (None) once the export no longer needs them, so that
    their weights are freed.
    """

    teacher: fx.GraphModule | None
    specs: list[InputSpec]
    train: Dataset
    held_out: Dataset
    output_names: list[str]  # each output's ONNX name
    kinds: list[str]  # each output's kind: logits, embedding, regression, ignored
    costs: SampleCosts
    checkpoint: LoadedCheckpoint | None = None  # set when the model is a Hugging Face folder
    # Whether each output is a causal language model's next-token logits, scored by perplexity
    # on the held-out text too (empty: none is).
    next_token: list[bool] = field(default_factory=list)

    @property
    def model_bytes(self) -> int:
        """The bytes of the original's weights, as loaded."""
        return self.costs.model_bytes


@dataclass
class _Inputs:
    program: ExportedProgram
    specs: list[InputSpec]
    train: Dataset
    held_out: Dataset
    checkpoint: LoadedCheckpoint | None = None


def load(model: Path, data: Path | None, config: CompressionConfig, workdir: Path,
         control: JobControl, log: JobLog) -> LoadedJob:
    """Load the model at `model` and the job's data (or sample it); refuse a job the machine
    cannot hold up front. A Hugging Face archive is unpacked inside `workdir`."""
    with log.stage(LOADING):
        control.report(LOADING, 0.0, f"loading {model.name}")
        check_resources(model, workdir, config)
        inputs = _load_inputs(model, data, config, workdir)
        if inputs.checkpoint is not None and inputs.checkpoint.max_length < config.data.max_length:
            log.info(f"data.max_length {config.data.max_length} is more than the model's "
                     f"{inputs.checkpoint.max_length} positions: samples are "
                     f"{inputs.checkpoint.max_length} tokens at most")
        log.info(f"inputs: {[(s.name, s.shape, str(s.dtype)) for s in inputs.specs]}; "
                 f"data: {inputs.train.source} ({len(inputs.train)} train, "
                 f"{len(inputs.held_out)} held-out)")
        # The student made later shares every tensor it does not change with this original:
        # one copy of the weights in memory.
        teacher = shallow_copy(inputs.program.module()).eval()
        names, kinds, next_token = output_kinds(teacher, inputs.held_out, config,
                                                inputs.checkpoint)
        log.info(f"outputs: {dict(zip(names, kinds, strict=True))}"
                 + "".join(f"; {name}: next-token logits, scored by perplexity too"
                           for name, lm in zip(names, next_token, strict=True) if lm))
        costs = SampleCosts.measure(teacher, inputs.train.take(torch.arange(1)))
    return LoadedJob(teacher, inputs.specs, inputs.train, inputs.held_out,
                     names, kinds, costs, inputs.checkpoint, next_token)


def output_kinds(teacher: fx.GraphModule, held_out: Dataset, config: CompressionConfig,
                 checkpoint: LoadedCheckpoint | None = None,
                 ) -> tuple[list[str], list[str], list[bool]]:
    """Return each output's ONNX name, kind (logits, embedding, regression, ignored: the
    kind decides its loss and how it is scored) and whether it is next-token logits
    (`next_token_outputs`). One run of the original on two samples."""
    sample = held_out.take(torch.arange(min(2, len(held_out))))
    with torch.no_grad():
        raw = call(teacher, sample)
    outputs = [leaf for leaf in tree_leaves(raw) if isinstance(leaf, torch.Tensor)]
    names = onnx_output_names(raw)
    kinds = detect_output_kinds(teacher, raw, outputs, config.finetune.loss, names)
    return names, kinds, next_token_outputs(checkpoint, kinds, outputs, sample)


def next_token_outputs(checkpoint: LoadedCheckpoint | None, kinds: list[str],
                       outputs: list[torch.Tensor], sample: dict[str, torch.Tensor],
                       ) -> list[bool]:
    """Return which outputs are a causal language model's next-token logits: those of kind
    logits, shaped (batch, sequence, vocabulary) over `input_ids`, of a Hugging Face checkpoint
    that transformers lists as a causal LM (GPT2LMHeadModel, LlamaForCausalLM, ...) and that
    takes an `attention_mask`. A `.pt2` program does not say whether it is causal: none of its
    outputs is."""
    if checkpoint is None or "input_ids" not in sample or "attention_mask" not in sample:
        return [False] * len(outputs)
    from compressor.load.huggingface.checkpoint import is_causal_lm

    if not is_causal_lm(checkpoint.checkpoint):
        return [False] * len(outputs)
    ids = sample["input_ids"]
    return [kind == "logits" and out.dim() == 3 and out.shape[:2] == ids.shape
            for kind, out in zip(kinds, outputs, strict=True)]


def check_resources(model: Path, out_dir: Path, config: CompressionConfig | None = None) -> None:
    """Refuse a job up front when the machine cannot hold the model, its artifacts or what it
    keeps for a retry.

    The estimate is from the upload's weights as they will be loaded (float32): the peak memory
    a job reaches (`memory.model_memory_estimate`) against what the machine has available, and
    the artifacts (`ARTIFACT_BYTES_PER_WEIGHT_BYTE` × the weights) plus the products the job
    keeps in `out_dir/resume/` (`resume.kept_bytes_estimate`; for `config`, all defaults when
    None) against the free space of `out_dir`.
    """
    weights = loaded_weight_bytes(model)
    needed = model_memory_estimate(weights)
    available = available_memory_bytes()
    if available is not None and needed > available:
        raise ResourceError(
            f"this model needs about {format_bytes(needed)} of memory to compress "
            f"({format_bytes(BASE_PEAK_BYTES)} + {PEAK_PER_MODEL_BYTE:g}× its "
            f"{format_bytes(weights)} of float32 weights) and this machine has "
            f"{format_bytes(available)} available; run the job on a machine (or worker) with "
            "more memory, or free memory and retry")
    disk = job_disk_bytes(weights, config or CompressionConfig())
    free = free_disk_bytes(out_dir)
    if free is not None and sum(disk.values()) > free:
        raise ResourceError(
            f"the job needs about {format_bytes(sum(disk.values()))} of disk and {out_dir} has "
            f"{format_bytes(free)} free: {describe_disk_bytes(disk)}; free some space (or delete "
            f"old jobs) and retry{disk_advice(disk)}")


def artifact_bytes(weight_bytes: int) -> int:
    """Return the disk a job's artifacts take at most, for `weight_bytes` of float weights."""
    return ARTIFACT_BYTES_PER_WEIGHT_BYTE * weight_bytes


def job_disk_bytes(weight_bytes: int, config: CompressionConfig) -> dict[str, int]:
    """Return the most disk a job with `config` takes at once beside its inputs, by part, for
    `weight_bytes` of float weights: its artifacts (key "artifacts") and each product it keeps
    for a retry until it ends (`resume.kept_bytes_estimate`)."""
    kept = kept_bytes_estimate(weight_bytes, theta_share(config),
                               config.finetune.steps > 0 and config.finetune.checkpoint_every > 0)
    return {"artifacts": artifact_bytes(weight_bytes), **kept}


def describe_disk_bytes(disk: dict[str, int]) -> str:
    """Say what `job_disk_bytes` counted, for an error message."""
    kept = ", ".join(f"{name} {format_bytes(size)}" for name, size in disk.items()
                     if name != "artifacts")
    return (f"its artifacts about {format_bytes(disk['artifacts'])}, and what it keeps for a "
            f"retry until it ends ({kept})")


def disk_advice(disk: dict[str, int]) -> str:
    """Return how a job could need less disk (", or ..."), or "" when there is no such knob."""
    if "fine-tuning checkpoints" not in disk:
        return ""
    return (", or set finetune.checkpoint_every 0 to keep no fine-tuning checkpoints (a retried "
            "job then trains from its first step)")


def theta_share(config: CompressionConfig) -> float:
    """Return the most θ can take, as a share of the model's weights: `ratio` for a job whose
    every layer is sized by it, else all of them (target mode, overrides, a method's own size;
    a layer whose θ would be larger than its weight stays dense)."""
    method = config.method
    size_field = method_class(method.name).size_field
    own_size = size_field is not None and getattr(method, size_field, None) is not None
    if config.target is None and not config.overrides and not own_size:
        return min(1.0, config.ratio)
    return 1.0


def _load_inputs(model: Path, data: Path | None, config: CompressionConfig,
                 workdir: Path) -> _Inputs:
    """Load the program safely and the job's data (or sample it), split train / held-out.

    A Hugging Face folder or archive (unpacked inside `workdir`) becomes a program first.
    """
    if huggingface.is_checkpoint(model):
        loaded = huggingface.load_checkpoint(model, workdir, config.data.max_length)
        dataset = huggingface.checkpoint_data(loaded, data, config.data, config.finetune.seed)
        train, held_out = dataset.split(config.data.holdout_fraction, config.finetune.seed)
        return _Inputs(loaded.program, loaded.specs, train, held_out, loaded)
    program = load_program(model)
    specs = input_specs(program)
    if data is None:
        dataset = synthesize_data(specs, config.data.synthetic_samples, config.finetune.seed)
    else:
        dataset = load_data(data, specs, config.data.max_samples)
    train, held_out = dataset.split(config.data.holdout_fraction, config.finetune.seed)
    largest = min(max(64, config.finetune.batch_size), len(dataset))
    check_guards(program, dataset, (1, largest))
    return _Inputs(program, specs, train, held_out)
