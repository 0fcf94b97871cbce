"""The ONNX export and its checks on tiny models: names, dynamic batch, tolerances, int8, int4,
files.

Pinned: the ONNX model takes the program's inputs by the program's names (in order, dtypes
kept) and names its outputs `output_<i>` (a dict's keys when the model returns one); its batch
dimension is symbolic and onnxruntime runs it at batch 1 and 5 as PyTorch does; `verify_onnx`
passes an export within `atol + rtol·|torch|` and raises `VerificationError` naming the output
once one value is past it (in any batch), on a NaN, or on a shape mismatch; `differences` counts
a NaN (in either array, in any chunk) as out of tolerance; `quantize_int8` writes a smaller
model that runs and stays within `verify_quantized`'s tolerance; `quantize_int4` turns every
Linear into MatMulNBits (smaller than int8, within the same tolerance), keeps a table's all-zero
row zero without numpy's warnings, says what to use instead on a model without MatMul weights; an export or quantization that fails leaves nothing behind;
a model past protobuf's limit keeps its weights in `<name>.data`, and `move_onnx` /
`remove_onnx` / `onnx_bytes` treat the two files as one (int8 and int4 keep theirs beside them).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import save_file
from torch.export import Dim

from compressor.errors import ExportError, ResourceError, VerificationError
from compressor.export.onnx import (
    dynamic_shapes,
    export_onnx,
    move_onnx,
    onnx_bytes,
    onnx_output_names,
    remove_onnx,
)
from compressor.export.quantize import quantize_int4, quantize_int8, verify_quantized
from compressor.export.verify import (
    differences,
    onnx_outputs,
    onnx_session,
    run_onnx,
    torch_outputs,
    verify_onnx,
)
from compressor.load.data import Dataset, InputSpec, input_specs
from compressor.runtime import memory
from compressor.runtime.graph import shallow_copy
from compressor.runtime.memory import format_bytes, quantizing_peak_bytes
from compressor.runtime.outputs import call, run_outputs
from tests.support.corpus_programs import ManyOutputs
from tests.support.tiny_models import MODEL_CLASSES, example_inputs, make_pt2

ATOL, RTOL = 1e-4, 1e-3  # the config's defaults (export.atol, export.rtol)
_ORT_DTYPES = {torch.float32: "tensor(float)", torch.int64: "tensor(int64)"}


class Exported:
    """A tiny model's program, the module that is exported, and its ONNX file."""

    def __init__(self, kind: str, folder: Path) -> None:
        self.kind = kind
        self.program = torch.export.load(str(make_pt2(kind, folder / f"{kind}.pt2")))
        self.module = shallow_copy(self.program.module())  # program.module() refuses .eval()
        self.specs = input_specs(self.program)
        self.path = folder / f"{kind}.onnx"
        export_onnx(self.module, self.inputs(2), self.specs, self.path, opset=18)

    def inputs(self, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
        return example_inputs(MODEL_CLASSES[self.kind](), batch=batch, seed=seed)

    def reference(self, samples: int, batch_size: int = 4):
        held_out = Dataset(self.inputs(samples, seed=5), False, "test")
        return torch_outputs(self.module, held_out, batch_size=batch_size)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Exported]:
    folder = tmp_path_factory.mktemp("exported")
    return {kind: Exported(kind, folder) for kind in MODEL_CLASSES}


# -- names and the dynamic batch ------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(MODEL_CLASSES))
def test_onnx_inputs_are_the_programs_inputs_by_name_in_order(exported, kind):
    model = exported[kind]
    session = onnx_session(model.path)
    names = list(model.program.graph_signature.user_inputs)
    assert [i.name for i in session.get_inputs()] == names
    for given, spec in zip(session.get_inputs(), model.specs, strict=True):
        assert given.type == _ORT_DTYPES[spec.dtype]
        assert isinstance(given.shape[0], str)  # the batch is symbolic
        assert tuple(given.shape[1:]) == spec.shape[1:]  # the rest as the program fixes them
    with torch.no_grad():
        raw = call(model.module, model.inputs(2))
    assert [o.name for o in session.get_outputs()] == onnx_output_names(raw)
    assert [o.name for o in session.get_outputs()] == [
        f"output_{i}" for i in range(len(run_outputs(model.module, model.inputs(2))))]


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("kind", list(MODEL_CLASSES))
def test_onnxruntime_runs_any_batch_as_pytorch_does(exported, kind, batch):
    model = exported[kind]
    inputs = model.inputs(batch, seed=3)
    got = run_onnx(onnx_session(model.path), inputs)
    with torch.no_grad():
        want = run_outputs(model.program.module(), inputs)
    assert len(got) == len(want)
    for actual, expected in zip(got, want, strict=True):
        assert actual.shape == tuple(expected.shape) and actual.shape[0] == batch
        torch.testing.assert_close(torch.from_numpy(actual), expected, rtol=1e-4, atol=1e-5)


def test_a_dicts_keys_name_the_onnx_outputs(tmp_path):
    torch.manual_seed(0)
    model = ManyOutputs("dict").eval()
    x = torch.randn(3, 32)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: Dim("batch", max=64)},))
    module = shallow_copy(program.module())
    path = tmp_path / "dict.onnx"
    export_onnx(module, {"x": x}, input_specs(program), path, opset=18)
    session = onnx_session(path)
    assert [o.name for o in session.get_outputs()] == ["logits", "embedding"]
    logits, embedding = run_onnx(session, {"x": torch.randn(5, 32)})
    assert logits.shape == (5, 10) and embedding.shape == (5, 32)


def test_every_input_shares_one_batch_dim_within_the_tightest_program_bound():
    specs = [InputSpec("ids", (None, None), torch.int64, batch_max=8),
             InputSpec("mask", (None, 16), torch.int64, batch_max=100)]
    shapes = dynamic_shapes(specs)
    assert set(shapes) == {"ids", "mask"} and set(shapes["mask"]) == {0}
    batch = shapes["ids"][0]
    assert shapes["mask"][0] is batch and (batch.min, batch.max) == (1, 8)
    assert shapes["ids"][1] is Dim.AUTO  # another dynamic dim: left to the exporter
    unbounded = dynamic_shapes([InputSpec("x", (None, 4), torch.float32)])["x"][0]
    assert (unbounded.min, unbounded.max) == (1, 2**20)


# -- verification --------------------------------------------------------------------------------


def test_a_correct_export_verifies(exported):
    model = exported["text"]
    reference = model.reference(9)  # batch 1, then 4, 4
    assert [len(batch["input_ids"]) for batch in reference.batches] == [1, 4, 4]
    parity = verify_onnx(model.path, reference, ATOL, RTOL)
    assert parity["passed"] and parity["samples"] == 9
    assert set(parity["max_abs_diff"]) == {"output_0", "output_1"}
    assert all(0 <= diff <= ATOL for diff in parity["max_abs_diff"].values())


@pytest.mark.parametrize("batch", [0, -1], ids=["batch-1", "last-batch"])
@pytest.mark.parametrize("output", [0, 1])
def test_verification_fails_once_one_value_is_past_atol_plus_rtol(exported, batch, output):
    model = exported["text"]
    reference = model.reference(9)
    want = reference.outputs[batch][output]
    index = (want.shape[0] - 1, *(0 for _ in want.shape[1:]))
    bound = ATOL + RTOL * abs(float(want[index]))
    original = want.copy()
    want[index] += 0.5 * bound  # within: onnxruntime differs from PyTorch by far less
    verify_onnx(model.path, reference, ATOL, RTOL)
    want[index] = original[index] + 2 * bound
    with pytest.raises(VerificationError, match=f"output output_{output}: max"):
        verify_onnx(model.path, reference, ATOL, RTOL)
    # A looser tolerance accepts the same difference.
    verify_onnx(model.path, reference, 3 * ATOL, 3 * RTOL)


def test_a_nan_fails_verification(exported):
    model = exported["mlp"]
    reference = model.reference(6)
    reference.outputs[1][0][2, 3] = np.nan  # batches of 1, 4, 1: inside the second
    with pytest.raises(VerificationError, match="output output_0"):
        verify_onnx(model.path, reference, ATOL, RTOL)


def test_a_shape_mismatch_fails_verification(exported):
    model = exported["mlp"]
    reference = model.reference(6)
    reference.outputs[1][0] = reference.outputs[1][0][:, :5]
    with pytest.raises(VerificationError, match="has shape"):
        verify_onnx(model.path, reference, ATOL, RTOL)


def test_onnx_outputs_cover_every_batch_of_a_dataset(exported):
    model = exported["conv"]
    dataset = Dataset(model.inputs(7, seed=4), False, "test")
    outputs = onnx_outputs(model.path, dataset, batch_size=3)
    assert [o[0].shape[0] for o in outputs] == [3, 3, 1]
    with torch.no_grad():
        want = run_outputs(model.module, dataset.inputs)[0]
    got = torch.from_numpy(np.concatenate([o[0] for o in outputs]))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("where", "in_got"), [(0, True), (5, True), (7, False)])
def test_differences_count_a_nan_as_out_of_tolerance_in_any_chunk(monkeypatch, where, in_got):
    monkeypatch.setattr("compressor.export.verify._ELEMENTS_PER_CHUNK", 4)  # 4 values at a time
    want = np.linspace(-1, 1, 8).astype(np.float32)
    got = want.copy()
    (got if in_got else want)[where] = np.nan
    worst, excess = differences(want, got, ATOL, RTOL)
    assert np.isnan(worst) and np.isnan(excess)


def test_differences_measure_against_atol_plus_rtol():
    want = np.array([0.0, 2.0, -4.0, 1.0], np.float32)
    assert differences(want, want, ATOL, RTOL) == (0.0, -ATOL)  # nothing differs
    got = want.copy()
    got[2] += 0.01  # |diff| 0.01 against 1e-4 + 1e-3·4
    worst, excess = differences(want, got, ATOL, RTOL)
    assert worst == pytest.approx(0.01, rel=1e-4)
    assert excess == pytest.approx(0.01 - (ATOL + RTOL * 4), rel=1e-3)
    got[0] = np.inf
    assert differences(want, got, ATOL, RTOL) == (np.inf, np.inf)


# -- int8 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(MODEL_CLASSES))
def test_int8_is_smaller_runs_and_stays_within_its_tolerance(exported, kind, tmp_path):
    model = exported[kind]
    target = tmp_path / "int8.onnx"
    quantize_int8(model.path, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8.onnx"]  # no scratch left
    assert onnx_bytes(target) < 0.6 * onnx_bytes(model.path)
    weights = onnx.load(str(target)).graph.initializer
    assert any(w.data_type == onnx.TensorProto.INT8 for w in weights)
    session = onnx_session(target)
    assert [i.name for i in session.get_inputs()] == [s.name for s in model.specs]
    for batch in (1, 5):
        outputs = run_onnx(session, model.inputs(batch, seed=6))
        assert all(o.shape[0] == batch and np.isfinite(o).all() for o in outputs)
    reference = model.reference(9)
    checked = verify_quantized(target, reference, 0.3)
    assert checked["passed"] and all(0 < e <= 0.3 for e in checked["relative_l2"].values())
    with pytest.raises(VerificationError, match="relative L2"):
        verify_quantized(target, reference, 1e-9)  # int8 cannot match to float precision


def test_a_failed_quantization_leaves_nothing(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(ExportError, match="int8 quantization"):
        quantize_int8(broken, tmp_path / "int8.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.onnx"]


@pytest.mark.parametrize("quantize", [quantize_int8, quantize_int4])
def test_a_quantization_the_machine_lacks_the_memory_for_is_refused_before_it_starts(
        exported, quantize, tmp_path, monkeypatch):
    model = exported["mlp"]
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 1024)
    with pytest.raises(ResourceError) as raised:
        quantize(model.path, tmp_path / "quantized.onnx", largest_weight_bytes=4096)
    bits = "int8" if quantize is quantize_int8 else "int4"
    model_bytes = onnx_bytes(model.path)
    needed = quantizing_peak_bytes(bits, model_bytes, 4096)
    assert raised.value.message == (
        f"{bits} quantization of the {model_bytes / 1e6:,.1f} MB ONNX model needs about "
        f"{format_bytes(needed)} more memory, and 1.0 KiB is available: export without "
        "export.quantize, or run the job on a machine with more memory")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: int(needed / 0.9) + 1)
    quantize(model.path, tmp_path / "quantized.onnx", largest_weight_bytes=4096)  # fits
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: None)  # the machine is silent
    quantize(model.path, tmp_path / "again.onnx")


# -- int4 ----------------------------------------------------------------------------------------


class WideMLP(torch.nn.Module):
    """A few big Linear layers: where weight-only int4 pays."""

    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(256, 512)
        self.mid = torch.nn.Linear(512, 512)
        self.head = torch.nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mid(torch.relu(self.up(x)))))


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """The wide MLP exported (its Linears are Gemm: 2-D inputs), with held-out references."""
    folder = tmp_path_factory.mktemp("wide")
    torch.manual_seed(0)
    x = torch.randn(8, 256)
    program = torch.export.export(WideMLP().eval(), (), {"x": x},
                                  dynamic_shapes={"x": {0: Dim("batch")}})
    module = shallow_copy(program.module())
    path = folder / "wide.onnx"
    export_onnx(module, {"x": x[:2]}, input_specs(program), path, opset=18)
    held_out = Dataset({"x": torch.randn(32, 256, generator=torch.Generator().manual_seed(5))},
                       False, "test")
    return path, torch_outputs(module, held_out, batch_size=8)


def _op_types(path: Path) -> list[str]:
    return [node.op_type for node in onnx.load(str(path)).graph.node]


def test_int4_of_a_table_with_an_all_zero_row_is_exact_there_and_warns_of_nothing(tmp_path):
    # an embedding table's padding row is all zeros: its blocks' scale is 0, which the
    # quantizer handles, but numpy warned of the division it evaluated anyway (in the job log)
    import warnings

    from onnx import TensorProto, helper

    table = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    table[0] = 0.0  # the padding row
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"])], "lookup",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 64])],
        [onnx.numpy_helper.from_array(table, "table")])
    source, target = tmp_path / "model.onnx", tmp_path / "int4.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        quantize_int4(source, target)
    assert _op_types(target) == ["GatherBlockQuantized"]
    (got,) = run_onnx(onnx_session(target), {"ids": torch.tensor([0, 3])})
    assert np.array_equal(got[0], np.zeros(64, np.float32))  # the padding row stays zero
    assert np.abs(got[1] - table[3]).max() < 0.5


def test_int4_turns_every_linear_into_matmulnbits_smaller_than_int8(wide, tmp_path):
    path, reference = wide
    assert _op_types(path).count("Gemm") == 3
    quantize_int8(path, tmp_path / "int8.onnx")
    target = tmp_path / "int4" / "model.onnx"
    target.parent.mkdir()
    quantize_int4(path, target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.onnx"]  # no scratch left
    ops = _op_types(target)
    assert ops.count("MatMulNBits") == 3 and "Gemm" not in ops and "MatMul" not in ops
    # 4 bits a weight and a scale and zero point per 32: under two thirds of int8's bytes
    assert onnx_bytes(target) < 0.7 * onnx_bytes(tmp_path / "int8.onnx")
    assert onnx_bytes(target) < 0.2 * onnx_bytes(path)
    session = onnx_session(target)
    for batch in (1, 5):
        (got,) = run_onnx(session, {"x": torch.randn(batch, 256)})
        assert got.shape == (batch, 10) and np.isfinite(got).all()
    int8 = verify_quantized(tmp_path / "int8.onnx", reference, None)["relative_l2"]["output_0"]
    checked = verify_quantized(target, reference, 0.3, "int4")
    error = checked["relative_l2"]["output_0"]
    assert int8 < error <= 0.3  # measured: int8 0.016, int4 0.12 on random weights
    with pytest.raises(VerificationError, match="the int4 model differs"):
        verify_quantized(target, reference, 1e-3, "int4")


def test_int4_with_the_quantizers_defaults_quantizes_matmuls_only_in_blocks_of_128(
        exported, tmp_path):
    model = exported["text"]  # its projections are MatMul, its table a Gather
    ours, defaults = tmp_path / "ours.onnx", tmp_path / "defaults.onnx"
    quantize_int4(model.path, ours)
    quantize_int4(model.path, defaults, onnxruntime_defaults=True)
    assert "GatherBlockQuantized" in _op_types(ours) and "Gather" not in _op_types(ours)
    assert "GatherBlockQuantized" not in _op_types(defaults) and "Gather" in _op_types(defaults)
    blocks = {attribute.i for node in onnx.load(str(defaults)).graph.node
              if node.op_type == "MatMulNBits"
              for attribute in node.attribute if attribute.name == "block_size"}
    assert blocks == {128}
    reference = model.reference(9)
    for path in (ours, defaults):
        errors = verify_quantized(path, reference, 0.3, "int4")["relative_l2"]
        assert all(0 < e <= 0.3 for e in errors.values())


def test_int4_of_a_convolution_only_model_says_what_to_use_instead(tmp_path):
    class ConvOnly(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 8, 3)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.conv(image).mean((2, 3))

    image = torch.randn(2, 1, 12, 12)
    program = torch.export.export(ConvOnly().eval(), (), {"image": image},
                                  dynamic_shapes={"image": {0: Dim("batch")}})
    path = tmp_path / "conv.onnx"
    export_onnx(shallow_copy(program.module()), {"image": image}, input_specs(program), path,
                opset=18)
    with pytest.raises(ExportError) as caught:
        quantize_int4(path, tmp_path / "int4.onnx")
    message = caught.value.message
    assert "MatMul" in message and "export.quantize 'int8'" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv.onnx"]


def test_a_failed_int4_quantization_leaves_nothing(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(ExportError, match="int4 quantization .* failed"):
        quantize_int4(broken, tmp_path / "int4.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.onnx"]


# -- files ---------------------------------------------------------------------------------------


def test_a_failed_export_leaves_what_was_there(exported, tmp_path, monkeypatch):
    model = exported["mlp"]
    target = tmp_path / "model.onnx"
    target.write_bytes(b"the last good model")

    def fails_half_way(onnx_model, path):
        Path(path).write_bytes(b"half a model")
        raise OSError("disk full")

    monkeypatch.setattr("compressor.export.onnx.save_single_file", fails_half_way)
    with pytest.raises(ExportError, match="disk full"):
        export_onnx(model.module, model.inputs(2), model.specs, target, opset=18)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no scratch left
    assert target.read_bytes() == b"the last good model"


@pytest.fixture
def external(exported, tmp_path, monkeypatch) -> Path:
    """The MLP exported as if past protobuf's limit: model.onnx and model.onnx.data."""
    monkeypatch.setattr("compressor.export.onnx._PROTOBUF_LIMIT", 0)
    model = exported["mlp"]
    folder = tmp_path / "first"
    folder.mkdir()
    export_onnx(model.module, model.inputs(2), model.specs, folder / "model.onnx", opset=18)
    return folder / "model.onnx"


def _runs(path: Path, exported) -> None:
    model = exported["mlp"]
    inputs = model.inputs(3, seed=8)
    (got,) = run_onnx(onnx_session(path), inputs)
    with torch.no_grad():
        (want,) = run_outputs(model.module, inputs)
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-5)


def test_weights_past_the_limit_live_in_a_data_file_counted_with_the_model(external, exported):
    data = external.with_name("model.onnx.data")
    assert sorted(p.name for p in external.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert data.stat().st_size > external.stat().st_size
    assert onnx_bytes(external) == external.stat().st_size + data.stat().st_size
    _runs(external, exported)
    quantize_int8(external, external.with_name("int8.onnx"))  # keeps its data beside it too
    assert data.is_file() and external.with_name("int8.onnx").is_file()
    assert onnx_bytes(external.with_name("int8.onnx")) < onnx_bytes(external)
    (got,) = run_onnx(onnx_session(external.with_name("int8.onnx")),
                      exported["mlp"].inputs(2))
    assert got.shape == (2, 10)


def test_int4_of_weights_past_the_limit_keeps_a_data_file_beside_it(external, exported):
    target = external.with_name("int4.onnx")
    quantize_int4(external, target)
    assert target.with_name("int4.onnx.data").is_file()
    assert "MatMulNBits" in _op_types(target)
    assert onnx_bytes(target) < onnx_bytes(external)
    (got,) = run_onnx(onnx_session(target), exported["mlp"].inputs(2))
    assert got.shape == (2, 10)


def test_move_onnx_moves_the_model_and_its_data_together(external, exported, tmp_path):
    size = onnx_bytes(external)
    target = tmp_path / "second" / "model.onnx"
    target.parent.mkdir()
    move_onnx(external, target)
    assert list(external.parent.iterdir()) == []
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert onnx_bytes(target) == size
    _runs(target, exported)  # the model finds its data by its (unchanged) file name


def test_move_onnx_keeps_the_name_the_model_finds_its_data_by(external):
    with pytest.raises(ValueError, match="keeps its name"):
        move_onnx(external, external.with_name("renamed.onnx"))
    assert sorted(p.name for p in external.parent.iterdir()) == ["model.onnx", "model.onnx.data"]


def test_move_onnx_drops_a_stale_data_file_at_the_target(exported, tmp_path):
    target = tmp_path / "served" / "mlp.onnx"
    target.parent.mkdir()
    target.write_bytes(b"an older model")
    target.with_name("mlp.onnx.data").write_bytes(b"its weights")
    source = tmp_path / "mlp.onnx"
    source.write_bytes(exported["mlp"].path.read_bytes())  # one file, no data
    move_onnx(source, target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["mlp.onnx"]
    assert onnx_bytes(target) == target.stat().st_size == exported["mlp"].path.stat().st_size
    _runs(target, exported)


def test_remove_onnx_removes_both_files_and_tolerates_missing_ones(external, tmp_path):
    remove_onnx(external)
    assert list(external.parent.iterdir()) == []
    remove_onnx(external)  # nothing left: no error
    alone = tmp_path / "alone.onnx"
    alone.write_bytes(b"x")
    remove_onnx(alone)
    assert not alone.exists()
    orphan = tmp_path / "orphan.onnx.data"
    orphan.write_bytes(b"x")
    remove_onnx(tmp_path / "orphan.onnx")
    assert not orphan.exists()
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))


def test_int4_of_a_tied_factorized_head_keeps_the_shared_factor_float(tmp_path):
    # The compact tied head reads one factor as its MatMul's weight and as its table's rows;
    # quantizing it for both (two packings) made a model onnxruntime refused to load.
    import compressor
    from tests.support.corpus_programs import TinyLlama, exported_decoder

    torch.manual_seed(0)
    ids = torch.randint(0, 96, (64, 16), generator=torch.Generator().manual_seed(1))
    program = exported_decoder(TinyLlama(tied=True), ids)
    torch.export.save(program, tmp_path / "tied.pt2")
    save_file({"input_ids": ids}, tmp_path / "ids.safetensors")
    result = compressor.compress(
        tmp_path / "tied.pt2", {"ratio": 0.5, "min_layer_params": 0, "finetune": {"steps": 0},
                                "export": {"form": "factorized", "quantize": "int4"}},
        data=tmp_path / "ids.safetensors", out_dir=tmp_path / "out")
    assert result.report["plan"]["layers"][-1].get("tied_embedding")
    graph = onnx.load(str(result.model_path)).graph
    ops = [node.op_type for node in graph.node]
    assert "MatMulNBits" in ops  # the blocks' projections are 4-bit
    shared = [name for name in {i for n in graph.node if n.op_type == "Gather" for i in n.input}
              if sum(name in n.input for n in graph.node) > 1]
    assert shared  # the head's factor, read by its MatMul and its rows' Gather, stays float
    (logits,) = run_onnx(onnx_session(result.model_path), {"input_ids": ids[:3]})
    assert logits.shape == (3, 16, 96) and np.isfinite(logits).all()
