"""Size is a non-event: one copy of the weights, statistics that share, refusals up front, and
weights past protobuf's 2 GiB in a data file beside model.onnx."""

from __future__ import annotations

import gc
import tempfile
import weakref
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.export import Dim

import compressor
from compressor.config import CompressionConfig
from compressor.errors import ResourceError
from compressor.export.onnx import export_onnx, save_single_file
from compressor.export.verify import differences, onnx_session, run_onnx
from compressor.load import stage as load_stage
from compressor.load.data import Dataset, InputSpec
from compressor.load.stage import LoadedJob
from compressor.plan.calibration import calibrate, collect_layer_stats
from compressor.plan.layers import find_layers
from compressor.plan.planning import plan_layers
from compressor.plan.stage import PlannedJob
from compressor.rewrite.forms import materialize, own_copies_
from compressor.rewrite.parametrize import theta_of
from compressor.rewrite.stage import rewrite
from compressor.runtime import layers
from compressor.runtime.context import JobContext
from compressor.runtime.costs import SampleCosts
from compressor.runtime.graph import shallow_copy
from compressor.runtime.memory import loaded_weight_bytes
from tests.support.tiny_models import TinyTextEncoder, example_inputs


class _Attention(nn.Module):
    """Three projections of one input (like query, key, value), then an output projection."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)
        self.out = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), -1) @ self.v(x)
        return self.out(mixed).mean(1)


def _program(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(4, 6, 32)
    program = torch.export.export(_Attention().eval(), (), kwargs={"x": x},
                                  dynamic_shapes={"x": {0: Dim("batch", min=1, max=1024)}})
    path = tmp_path / "attention.pt2"
    torch.export.save(program, str(path))
    return program, path


def _rewritten(tmp_path):
    program, _ = _program(tmp_path)
    teacher = shallow_copy(program.module()).eval()
    config = CompressionConfig.parse({"ratio": 0.5, "min_layer_params": 0,
                                      "allocation": "uniform",
                                      "method": {"name": "lowrank", "init": "activation_aware"}})
    plan = plan_layers(*find_layers(teacher), config)
    train = Dataset({"x": torch.randn(16, 6, 32)}, False, "test")
    job = JobContext.quiet(SampleCosts.measure(teacher, train.take(torch.arange(1))))
    stats = calibrate(teacher, plan, train, job)
    loaded = LoadedJob(teacher, [], train, train, ["output_0"], ["regression"], job.costs)
    student = rewrite(loaded, PlannedJob(plan, stats), config.finetune.grad_reduction, job)
    return teacher, student, plan, stats


def test_the_student_shares_every_tensor_it_does_not_change(tmp_path):
    teacher, student, plan, stats = _rewritten(tmp_path)
    assert stats == {}  # consumed while θ was made
    compressed = {p.layer.name for p in plan.compressed}
    assert compressed
    student_state = student.state_dict(keep_vars=True)
    for name, tensor in teacher.state_dict(keep_vars=True).items():
        layer, _, attr = name.rpartition(".")
        if layer in compressed:  # its weight became θ, its bias is its own (it may train)
            assert attr == "weight" or student_state[name].data_ptr() != tensor.data_ptr()
        else:
            assert student_state[name] is tensor


def test_what_the_compact_form_shares_with_the_original_is_copied_once_per_tensor():
    # A checkpoint's weights share one memory-mapped file, released only with the last of them.
    module = nn.Module()
    module.a, module.b = nn.Linear(3, 4), nn.Module()
    module.b.w = module.a.weight  # a second name for one tensor (a tied table)
    module.register_buffer("scale", torch.ones(4))
    original = module.a.weight
    bias = module.a.bias
    copied = own_copies_(module, {original.untyped_storage().data_ptr(),
                                  module.scale.untyped_storage().data_ptr()})
    assert copied == 4 * 3 * 4 + 4 * 4
    assert module.a.weight is module.b.w and isinstance(module.a.weight, nn.Parameter)
    assert module.a.weight.untyped_storage().data_ptr() != original.untyped_storage().data_ptr()
    torch.testing.assert_close(module.a.weight, original, rtol=0, atol=0)
    assert module.a.bias is bias  # not the original's: left as it was
    assert "scale" in dict(module.named_buffers())


def test_the_dense_form_takes_theta_as_it_makes_each_weight(tmp_path):
    teacher, student, plan, _ = _rewritten(tmp_path)
    x = torch.randn(3, 6, 32)
    with torch.no_grad():
        expected = student(x=x)
        dense = materialize(student, teacher, plan, consume=True)
        torch.testing.assert_close(dense(x=x), expected)
    for entry in plan.compressed:
        assert all(t.numel() == 0 for t in theta_of(student, entry.layer.name))


def test_layers_reading_one_input_share_one_gram_matrix(tmp_path):
    program, _ = _program(tmp_path)
    module = program.module()
    layers, _ = find_layers(module)
    x = torch.randn(5, 6, 32)
    stats = collect_layer_stats(module, layers, [{"x": x}])
    assert stats["q"].gram is stats["k"].gram is stats["v"].gram
    rows = x.reshape(-1, 32).double()
    torch.testing.assert_close(stats["q"].gram, rows.T @ rows)
    assert stats["out"].gram is not stats["q"].gram and stats["q"].rows == 30


def test_a_model_the_machine_cannot_hold_is_refused_up_front(tmp_path, monkeypatch):
    _, path = _program(tmp_path)
    monkeypatch.setattr(load_stage, "available_memory_bytes", lambda: 1000)
    with pytest.raises(ResourceError) as caught:
        compressor.compress(path, {"ratio": 0.5, "finetune": {"steps": 0}}, out_dir=tmp_path / "out")
    assert caught.value.code == "insufficient_resources"
    assert "needs about" in caught.value.message and "more memory" in caught.value.message
    assert not (tmp_path / "out" / "model.onnx").exists()
    assert "insufficient_resources" in (tmp_path / "out" / "job.log").read_text()


def test_half_precision_checkpoints_are_counted_at_their_float32_size(tmp_path):
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    save_file({"a": torch.zeros(100, 10, dtype=torch.bfloat16),
               "b": torch.zeros(7, dtype=torch.float16),
               "c": torch.zeros(5, dtype=torch.float32),
               "ids": torch.zeros(3, dtype=torch.int64)}, folder / "model.safetensors")
    (folder / "broken.safetensors").write_bytes(b"\xff" * 16)  # not one: counted as it is
    files = sum(p.stat().st_size for p in folder.iterdir())
    loaded = files + 100 * 10 * 2 + 7 * 2  # bf16 and fp16 load as float32: twice their bytes
    assert loaded_weight_bytes(folder) == loaded
    archive = tmp_path / "checkpoint.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        for path in folder.iterdir():
            out.write(path, f"checkpoint/{path.name}")
    assert loaded_weight_bytes(archive) == archive.stat().st_size + 100 * 10 * 2 + 7 * 2
    assert loaded_weight_bytes(folder / "config.json") == 2


def test_weights_past_the_protobuf_limit_go_to_a_data_file_served_beside_the_model(
        tmp_path, monkeypatch):
    _, path = _program(tmp_path)
    monkeypatch.setattr("compressor.export.onnx._PROTOBUF_LIMIT", 0)  # every model counts as big
    out = tmp_path / "out"
    result = compressor.compress(path, {"ratio": 0.5, "finetune": {"steps": 0},
                                        "export": {"latency_seconds": 0}}, out_dir=out)
    data = out / "model.onnx.data"
    assert data.is_file() and data.stat().st_size > (out / "model.onnx").stat().st_size
    assert set(result.report["artifacts"]) >= {"model.onnx", "model.onnx.data", "job.log"}
    assert result.report["onnx_bytes"]["artifact"] == sum(
        (out / n).stat().st_size for n in ("model.onnx", "model.onnx.data"))
    assert sorted(p.name for p in out.iterdir()) == [
        "job.log", "model.onnx", "model.onnx.data", "report.json"]
    session = onnx_session(out / "model.onnx")
    (got,) = run_onnx(session, {"x": torch.randn(2, 6, 32)})
    assert got.shape == (2, 8)


def test_an_exported_modules_weights_are_freed_with_it(tmp_path):
    # onnxscript's rewrite rules keep the last graph they matched; export_onnx empties it, so
    # the last export's weights do not live on through verification.
    program, _ = _program(tmp_path)
    module = shallow_copy(program.module()).eval()
    weight = weakref.ref(module.get_submodule("q").weight)
    del program
    export_onnx(module, {"x": torch.randn(2, 6, 32)}, [InputSpec("x", (None, 6, 32), torch.float32)],
                tmp_path / "model.onnx", 18)
    assert weight() is not None
    del module
    gc.collect()
    assert weight() is None
    (got,) = run_onnx(onnx_session(tmp_path / "model.onnx"), {"x": torch.randn(3, 6, 32)})
    assert got.shape == (3, 8)


class _TiedRows(nn.Module):
    """The rows a tied head's table gives the input: the same parameter, a second name."""

    def __init__(self, table: nn.Parameter) -> None:
        super().__init__()
        self.At = table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.index_select(self.At, 1, ids.reshape(-1)).T.reshape(*ids.shape, -1)


class _TiedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.At = nn.Parameter(torch.randn(16, 50))
        self.rows = _TiedRows(self.At)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(ids) @ self.At


def test_a_weight_two_modules_share_is_freed_with_the_exported_module(tmp_path):
    # The exporter lifts the second name as a graph input and drops it; onnx_ir's input list
    # kept it (with the weight) for as long as onnxscript's rewrite rules keep that graph.
    ids = torch.randint(0, 50, (2, 5))
    module = shallow_copy(torch.export.export(_TiedHead().eval(), (), kwargs={"ids": ids})
                          .module())
    weight = weakref.ref(next(iter(module.parameters())))
    export_onnx(module, {"ids": ids}, [InputSpec("ids", (None, 5), torch.int64)],
                tmp_path / "model.onnx", 18)
    del module
    gc.collect()
    assert weight() is None
    (got,) = run_onnx(onnx_session(tmp_path / "model.onnx"), {"ids": ids})
    assert got.shape == (2, 5, 50)


def test_a_single_file_is_written_a_weight_at_a_time_and_reads_as_onnx_wrote_it():
    torch.manual_seed(0)
    module = TinyTextEncoder().eval()
    inputs = example_inputs(module, batch=2)
    exported = torch.onnx.export(module, (), kwargs=inputs, dynamo=True, optimize=False,
                                 verbose=False, report=False)
    exported.optimize()  # folds constants into new initializers, some of them unnamed tensors
    weights = list(exported.model.graph.initializers)
    with tempfile.TemporaryDirectory() as folder:
        whole, streamed = Path(folder) / "whole.onnx", Path(folder) / "streamed.onnx"
        save_single_file(exported.model, streamed)  # first: ir.save names the folded tensors
        ir.save(exported.model, whole)
        assert streamed.read_bytes() != whole.read_bytes()  # a graph per weight, merged on read
        read, written = onnx.load(str(streamed)), onnx.load(str(whole))
        for model in (read, written):  # the weights' value info comes after the others'
            model.graph.value_info.sort(key=lambda info: info.name)
        assert read == written  # every field, the weights in their order
        assert list(exported.model.graph.initializers) == weights  # the model is as it was
        onnx.checker.check_model(str(streamed), full_check=True)
        got = run_onnx(onnx_session(streamed), inputs)
    with torch.no_grad():
        expected = module(**inputs)
    for actual, wanted in zip(got, expected, strict=True):
        torch.testing.assert_close(torch.from_numpy(actual), wanted, rtol=1e-5, atol=1e-5)


def test_checking_sessions_do_not_prepack_weights(tmp_path, monkeypatch):
    made = []
    original = ort.InferenceSession

    def recording(path, options, **kwargs):
        try:
            made.append(options.get_session_config_entry("session.disable_prepacking"))
        except RuntimeError:  # not set: onnxruntime pre-packs
            made.append("0")
        return original(path, options, **kwargs)

    _, path = _program(tmp_path)
    monkeypatch.setattr("compressor.export.verify.ort.InferenceSession", recording)
    compressor.compress(path, {"ratio": 0.5, "finetune": {"steps": 0}, "export": {"latency_seconds": 0.01}},
                        out_dir=tmp_path / "out")
    # the checks (verification, the int8 baseline's fidelity) without pre-packing; the latency
    # figures (original, compressed, baseline) with it
    checks = made.index("0")
    assert checks >= 1 and made == ["1"] * checks + ["0"] * (len(made) - checks)
    assert len(made) - checks >= 3


def test_large_float64_products_are_summed_from_float32_chunks(monkeypatch):
    a, b = torch.randn(10_000, 24), torch.randn(10_000, 16)
    exact = a.double().T @ b.double()
    small = layers.add_product_(torch.zeros(24, 16, dtype=torch.float64), a, b)
    torch.testing.assert_close(small, exact, rtol=1e-12, atol=1e-10)  # float64 throughout
    monkeypatch.setattr(layers, "_FLOAT64_PRODUCT_MACS", 1000)
    large = layers.add_product_(torch.zeros(24, 16, dtype=torch.float64), a, b)
    assert not torch.equal(large, small)  # float32 chunks: rounded as float32 sums of 4096 rows
    torch.testing.assert_close(large, exact, rtol=1e-5, atol=1e-3)


def test_with_one_batch_each_layer_is_handed_over_as_it_is_reached(tmp_path):
    program, _ = _program(tmp_path)
    module = program.module()
    layers, _ = find_layers(module)
    x = torch.randn(5, 6, 32)
    whole = collect_layer_stats(module, layers, [{"x": x}])
    handed: list[str] = []
    shared_gram: list[weakref.ref] = []

    def complete(name, stats):
        handed.append(name)
        torch.testing.assert_close(stats.gram, whole[name].gram, rtol=0, atol=0)
        if name == "q":
            shared_gram.append(weakref.ref(stats.gram))
        if name == "out":  # q, k and v's Gram matrix is gone before the next one is handed over
            gc.collect()
            assert shared_gram[0]() is None

    assert collect_layer_stats(module, layers, [{"x": x}], complete) == {}
    assert handed == ["q", "k", "v", "out"]


def test_a_parametrized_weight_is_made_where_its_layer_uses_it(tmp_path):
    teacher, student, plan, _ = _rewritten(tmp_path)
    nodes = list(student.graph.nodes)
    for node in nodes:
        if node.op == "get_attr" and node.users:
            first_use = min(nodes.index(user) for user in node.users)
            assert nodes.index(node) == first_use - 1 or all(  # right before its first use
                n.op == "get_attr" for n in nodes[nodes.index(node):first_use])
    x = torch.randn(3, 6, 32)  # and it computes what the dense form computes
    torch.testing.assert_close(student(x=x), materialize(student, teacher, plan)(x=x),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("where", [0, 5])  # in the first chunk, in a later one
def test_a_nan_is_out_of_tolerance_in_any_chunk(monkeypatch, where):
    monkeypatch.setattr("compressor.export.verify._ELEMENTS_PER_CHUNK", 4)  # outputs compared 4 at a time
    want = np.zeros(8, np.float32)
    got = want.copy()
    got[where] = np.nan
    worst, excess = differences(want, got, 1e-4, 1e-3)
    assert np.isnan(worst) and np.isnan(excess)
    got[where] = 2e-4  # out of tolerance: reported as such, whatever the chunk
    worst, excess = differences(want, got, 1e-4, 1e-3)
    assert worst == pytest.approx(2e-4) and excess == pytest.approx(1e-4)
    assert differences(want, want, 1e-4, 1e-3) == (0.0, -1e-4)
