"""Every program in the corpus compresses to a verified ONNX or is refused with a clear message.

The corpus (`tests/support/corpus_programs.py`) holds programs exported the ways users export them. A
case that compresses must leave a model.onnx that onnxruntime runs at another batch size with
the program's input names and the original's outputs; a refusal must be a `CompressorError`
with the case's code and a message that names the problem and what to do. Nothing else, and
never an unexpected exception, may come out of `compressor.compress`.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

import compressor
from compressor.errors import CompressorError, InternalError
from compressor.load.data import input_specs, synthesize_data
from compressor.load.program import load_program
from compressor.runtime.outputs import run_outputs
from tests.support.corpus_programs import CASES, Case, save

FAST = {"finetune": {"steps": 2, "eval_every": 2, "batch_size": 8},
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
