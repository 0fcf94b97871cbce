"""Every program in the corpus compresses to a verified ONNX or is refused with a clear message.

The corpus (`tests/support/corpus_programs.py`) holds programs exported the ways users export them. A
case that compresses must leave a model.onnx that onnxruntime runs at another batch size with
the program's input names and the original's outputs; a refusal must be a `CompressorError`
with the case's code and a message that names the problem and what to do. Nothing else, and
never an unexpected exception, may come out of `compressor.compress`.

Nothing weight-bearing goes unmentioned: in every program of the corpus, each parameter of two or
more dimensions that the graph reads (found here from the graph itself, not from the layer
finder) belongs to a layer of the plan or is listed under `plan.skipped` with a reason.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

import compressor
from compressor.config import CompressionConfig
from compressor.errors import CompressorError, ConfigError, InternalError
from compressor.load.data import input_specs, synthesize_data
from compressor.load.program import load_program
from compressor.plan.layers import find_layers
from compressor.plan.planning import plan_layers
from compressor.runtime.outputs import run_outputs
from tests.support.corpus_programs import CASES, Case, export, save

FAST = {"ratio": 0.5, "finetune": {"steps": 2, "eval_every": 2, "batch_size": 8},
        "export": {"latency_seconds": 0}, "data": {"synthetic_samples": 24},
        "min_layer_params": 256}


def _config(case: Case) -> dict:
    config = json.loads(json.dumps(FAST))
    config.update(case.config)
    return config


def _fresh_inputs(program_path, batch: int) -> dict[str, torch.Tensor]:
    """Inputs the program accepts, `batch` samples, drawn like the pipeline's synthetic data."""
    specs = input_specs(load_program(program_path))
    return synthesize_data(specs, batch, seed=11).inputs


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_program_compresses_or_is_refused_clearly(case: Case, tmp_path):
    program_path = save(case, tmp_path / "model.pt2")
    out = tmp_path / "out"
    try:
        result = compressor.compress(program_path, _config(case), out_dir=out)
    except CompressorError as exc:
        assert not isinstance(exc, InternalError), exc.message
        assert case.refuses is not None, f"expected to compress, refused: {exc.code}: {exc.message}"
        assert exc.code == case.refuses, exc.message
        for fragment in case.says:
            assert fragment in exc.message
        assert "Traceback" not in exc.message and len(exc.message.splitlines()) == 1
        assert not (out / "model.onnx").exists() and (out / "job.log").is_file()
        return
    assert case.refuses is None, f"expected a refusal ({case.refuses}), but it compressed"
    report = result.report
    assert report["onnx_parity"]["passed"]
    assert any(layer["method"] != "dense" for layer in report["plan"]["layers"])
    skipped = {entry["name"] for entry in report["plan"]["skipped"]}
    for name in case.skipped:
        assert any(s == name or s.startswith(name + ".") for s in skipped), (name, skipped)
    assert len(skipped) == len(report["plan"]["skipped"])  # each skipped layer listed once
    # The artifact runs on fresh inputs at a batch size the job never used, under the program's
    # input names, and its outputs are the compressed model's: close to the original's.
    inputs = _fresh_inputs(program_path, batch=3)
    session = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(inputs)
    produced = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    expected = run_outputs(load_program(program_path).module(), inputs)
    assert len(produced) == len(expected)
    for got, want in zip(produced, expected, strict=True):
        assert got.shape == tuple(want.shape) and got.dtype == want.detach().numpy().dtype
        if want.is_floating_point():
            got64, want64 = got.astype(np.float64), want.detach().double().numpy()
            assert np.isfinite(got64).all()
            relative = np.linalg.norm(got64 - want64) / max(np.linalg.norm(want64), 1e-12)
            assert relative < 1.0, relative  # compressed at ratio 0.5: close, not equal


def test_the_corpus_covers_both_outcomes_and_names_are_unique():
    names = [c.name for c in CASES]
    assert len(set(names)) == len(names)
    refusals = [c for c in CASES if c.refuses]
    assert refusals and len(refusals) < len(CASES)
    assert all(c.says for c in refusals), "a refusal case must say what the message names"


def _weights_read(module: torch.fx.GraphModule) -> dict[str, tuple[int, ...]]:
    """Every parameter of two or more dimensions that some op of the graph reads, by name."""
    parameters = dict(module.named_parameters(remove_duplicate=False))
    return {node.target: tuple(parameters[node.target].shape) for node in module.graph.nodes
            if node.op == "get_attr" and node.target in parameters and node.users
            and parameters[node.target].dim() >= 2}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_weight_the_graph_reads_is_planned_or_skipped_with_its_reason(case: Case):
    module = export(case).module()
    weights = _weights_read(module)
    assert weights  # every corpus program has weights
    layers, skipped = find_layers(module)
    try:
        plan = plan_layers(layers, skipped, CompressionConfig.parse(_config(case)))
    except ConfigError as exc:  # nothing targeted: the refusal lists every weight and why
        planned, mentioned = set(), exc.message
    else:
        planned = {p.layer.name for p in plan.layers}
        assert all(entry.reason for entry in plan.skipped)
        mentioned = {entry.name: entry.reason for entry in plan.skipped}
    for target in weights:
        owner = target.removesuffix(".weight")
        assert owner in planned or owner in mentioned or target in mentioned, (
            f"{target} {weights[target]} is read by the graph but neither planned nor skipped")
