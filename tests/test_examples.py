"""The example models build, export with a dynamic batch, and their data files feed them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `examples/` is not installed

from examples.build import (  # noqa: E402
    ExampleArtifacts,
    build_digits,
    build_text,
    evaluate_onnx_accuracy,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ExampleArtifacts]:
    """Build both examples once, in quick mode."""
    out_dir = tmp_path_factory.mktemp("examples")
    return {"digits": build_digits(out_dir, quick=True), "text": build_text(out_dir, quick=True)}


pytestmark = pytest.mark.slow

NAMES = ["digits", "text"]


@pytest.mark.parametrize("name", NAMES)
def test_writes_every_file(built: dict[str, ExampleArtifacts], name: str) -> None:
    artifacts = built[name]
    for path in (artifacts.program, artifacts.data, artifacts.eval, artifacts.labels):
        assert path.is_file() and path.name.startswith(name)
    assert artifacts.program.name == f"{name}.pt2"


@pytest.mark.parametrize("name", NAMES)
def test_data_files_are_named_like_the_program_inputs(
    built: dict[str, ExampleArtifacts], name: str
) -> None:
    artifacts = built[name]
    inputs = set(torch.export.load(artifacts.program).graph_signature.user_inputs)
    data, held_out = load_file(artifacts.data), load_file(artifacts.eval)
    labels = load_file(artifacts.labels)
    assert set(data) == inputs and set(held_out) == inputs
    assert set(labels) == {"labels"} and labels["labels"].dtype == torch.int64
    assert {len(t) for t in held_out.values()} == {len(labels["labels"])}
    assert len({len(t) for t in data.values()}) == 1


@pytest.mark.parametrize("name", NAMES)
def test_program_runs_at_two_batch_sizes(built: dict[str, ExampleArtifacts], name: str) -> None:
    artifacts = built[name]
    module = torch.export.load(artifacts.program).module()
    held_out = load_file(artifacts.eval)
    for batch in (1, 37):
        with torch.no_grad():
            outputs = module(**{k: v[:batch] for k, v in held_out.items()})
        logits = outputs[0] if isinstance(outputs, tuple) else outputs
        assert logits.shape == (batch, artifacts.num_classes)


def test_text_returns_logits_and_hidden_states(built: dict[str, ExampleArtifacts]) -> None:
    module = torch.export.load(built["text"].program).module()
    held_out = load_file(built["text"].eval)
    with torch.no_grad():
        logits, hidden = module(**{k: v[:3] for k, v in held_out.items()})
    assert logits.shape[0] == 3 and hidden.shape[:2] == held_out["input_ids"][:3].shape


@pytest.mark.parametrize("name", NAMES)
def test_quick_accuracy_is_well_above_chance(built: dict[str, ExampleArtifacts], name: str) -> None:
    assert built[name].accuracy > 1.5 / built[name].num_classes


def test_onnx_export_keeps_the_accuracy(built: dict[str, ExampleArtifacts], tmp_path: Path) -> None:
    """Export the two-input text program to ONNX; onnxruntime must score what torch scored.

    The kwargs go in the program's input order: re-exporting `program.module()` with kwargs in
    another order (safetensors returns names sorted) silently swaps the inputs in torch 2.13.
    """
    artifacts = built["text"]
    program = torch.export.load(artifacts.program)
    held_out = load_file(artifacts.eval)
    names = program.graph_signature.user_inputs
    batch = torch.export.Dim("batch", min=1, max=65536)
    onnx_program = torch.onnx.export(
        program.module(),
        (),
        kwargs={name: held_out[name][:4] for name in names},
        dynamic_shapes={name: {0: batch} for name in names},
        dynamo=True,
        opset_version=18,
    )
    onnx_program.save(tmp_path / "text.onnx")
    onnx_accuracy = evaluate_onnx_accuracy(tmp_path / "text.onnx", artifacts.eval, artifacts.labels)
    assert onnx_accuracy == pytest.approx(artifacts.accuracy, abs=1e-6)
