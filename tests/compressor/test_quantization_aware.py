"""Quantization-aware distillation: θ trains through onnxruntime's int8, simulated exactly."""

import re

import pytest
import torch

import compressor
from compressor.config import CompressionConfig, FinetuneConfig
from compressor.errors import ConfigError
from compressor.export.onnx import export_onnx
from compressor.export.quantize import quantize_int8
from compressor.export.verify import onnx_session, run_onnx
from compressor.finetune.loop import parameter_groups
from compressor.finetune.quantization_aware import (
    Int8Simulation,
    SimulatedInt8,
    fake_int8_symmetric,
    fake_uint4_blocks,
    fake_uint8_asymmetric,
    quantization_aware,
)
from compressor.rewrite.forms import factorize
from compressor.rewrite.parametrize import theta_of
from compressor.runtime.outputs import run_outputs
from tests.support.students import tiny_student
from tests.support.tiny_models import make_pt2

FACTORIZED = {"ratio": 0.5, "min_layer_params": 0, "export": {"form": "factorized"}}
CHECKPOINTS = ("gpt2",)  # GPT-2's Conv1D: addmm, the weight stored (in, out)


def _student(kind, tmp_path):
    """A tiny model's original and its student at ratio 0.5, lowrank, as initialized (every
    layer of a Hugging Face checkpoint compressed alike)."""
    if kind in CHECKPOINTS:
        return tiny_student(kind, tmp_path, {**FACTORIZED, "allocation": "uniform",
                                              "data": {"max_length": 16}})
    return tiny_student(kind, tmp_path, FACTORIZED)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return {flag for line in cpuinfo if line.startswith("flags")
                    for flag in line.split(":", 1)[1].split()}
    except OSError:
        return set()


# Whether onnxruntime's int8 kernels here have int8 dot-product instructions to run on.
_INT8_DOT_PRODUCTS = bool(_cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def _relative_l2(actual, expected):
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


@pytest.mark.parametrize("kind", ["mlp", "conv", "text", "gpt2"])
def test_the_simulation_computes_what_onnxruntime_int8_computes(kind, tmp_path):
    # Linear and Conv1D (MatMul), Conv (left float), an embedding (Gather of a 4-bit table, or
    # of a uint8 one when tied) and each one's compact form: the simulated student and the real
    # int8 artifact agree to float rounding, where the float student is a quantization error
    # away from it. On three batches, two of which must agree: PyTorch's and onnxruntime's float
    # ops differ by ~1e-7, which can put a dynamic quantization's zero point on the other side
    # of a rounding boundary (GPT-2's student on its first 16 held-out samples: 0.0065 apart,
    # and a 1e-6 relative change of the simulation's quantized inputs moves it by exactly that;
    # on 8 at a time 9e-8 and 1.3e-7). A simulation that is wrong is wrong on every batch.
    loaded, plan_, student = _student(kind, tmp_path)
    assert plan_.compressed
    module = factorize(student, loaded.teacher, plan_).eval()
    batches = [loaded.held_out.take(torch.arange(start, start + 8)) for start in (0, 8, 16)]
    export_onnx(module, batches[0], loaded.specs, tmp_path / "float.onnx", 18)
    quantize_int8(tmp_path / "float.onnx", tmp_path / "int8.onnx")
    session = onnx_session(tmp_path / "int8.onnx")
    exact = []  # per batch: every output
    for batch in batches:
        int8 = [torch.from_numpy(a) for a in run_onnx(session, batch)]
        with torch.no_grad():
            floats = run_outputs(module, batch)
            simulated = run_outputs(SimulatedInt8(module), batch)
        for real, as_float, as_simulated in zip(int8, floats, simulated, strict=True):
            assert _relative_l2(as_float, real) > 1e-3
            if kind in CHECKPOINTS and not _INT8_DOT_PRODUCTS:
                # GPT-2 (its tied head compressed, the table's rows and the head reading one
                # Aᵀ, uint8 both): 9e-8 from the real int8 model where the CPU has int8 dot
                # products (AVX-512 VNNI), 0.0007 on an AVX2 CPU without them, against the
                # float's 0.030: the same simulation and file, so what is left there is
                # onnxruntime's kernel.
                assert _relative_l2(as_simulated, real) < 0.1 * _relative_l2(as_float, real)
        exact.append(all(_relative_l2(simulated_output, real) < 1e-5
                         for real, simulated_output in zip(int8, simulated, strict=True)))
    assert sum(exact) >= 2 or (kind in CHECKPOINTS and not _INT8_DOT_PRODUCTS)


class _TiedLM(torch.nn.Module):
    """Token ids in, next-token logits out; the head reads the embedding table (tied)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 32)
        self.mix = torch.nn.Linear(32, 32)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids)
        hidden = hidden + torch.tanh(self.mix(hidden))
        return torch.nn.functional.linear(hidden, self.embed.weight)


@pytest.mark.parametrize("vocab", [200, 300])  # 6,400 and 9,600 table numbers
def test_the_simulation_of_a_dense_tied_head_computes_what_onnxruntime_int8_computes(
        vocab, tmp_path):
    # The head's Transpose(table) is folded into an int8 weight of its own when the table
    # holds at most 8,192 numbers; past that, the Transpose stays a node over the table's
    # uint8 and the head runs in float on it (Gemma-3 270M's 262,144 x 640 table): the
    # simulation follows both.
    from compressor.config import CompressionConfig
    from compressor.finetune.quantization_aware import UNFOLDED_SHARED_TRANSPOSE
    from compressor.load.stage import load
    from compressor.runtime.joblog import JobLog
    from compressor.runtime.progress import JobControl
    from tests.support.tiny_models import export_pt2

    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (16, 8))
    pt2 = export_pt2(_TiedLM(vocab), {"input_ids": ids[:4]}, tmp_path / "tied.pt2")
    loaded = load(pt2, None, CompressionConfig.parse({}), tmp_path,
                  JobControl(None, None, 3600), JobLog(tmp_path / "job.log"))
    batch = {"input_ids": ids}
    export_onnx(loaded.teacher, batch, loaded.specs, tmp_path / "float.onnx", 18)
    quantize_int8(tmp_path / "float.onnx", tmp_path / "int8.onnx")
    import onnx

    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    float_head = any(node.op_type == "MatMul" for node in graph.node)
    assert float_head == (vocab * 32 > UNFOLDED_SHARED_TRANSPOSE)
    # the table's lookup: 4-bit blocks where only it reads the table (the head reads a
    # transposed copy), the tied table's uint8 where the head reads the table itself
    lookups = {node.op_type for node in graph.node if node.op_type.startswith("Gather")
               and node.input[0].startswith("embed")}
    assert lookups == ({"Gather"} if float_head else {"GatherBlockQuantized"})
    [real] = [torch.from_numpy(a) for a in run_onnx(onnx_session(tmp_path / "int8.onnx"), batch)]
    with torch.no_grad():
        [simulated] = run_outputs(SimulatedInt8(loaded.teacher), batch)
        [as_float] = run_outputs(loaded.teacher, batch)
    assert _relative_l2(as_float, real) > 1e-3
    assert _relative_l2(simulated, real) < 1e-5


@pytest.mark.parametrize("kind", ["mlp", "text"])
def test_the_simulation_smoothed_computes_what_onnxruntime_int8_of_the_smoothed_model_computes(
        kind, tmp_path, monkeypatch):
    # The export smooths before int8 (a Mul on each MatMul input, the weights' columns scaled):
    # simulated with the same factors, the student computes what that int8 artifact computes,
    # where the unsmoothed simulation is an int8 rounding away from it. On the text model one
    # token of 128 lands on a rounding tie with all four of its inputs smoothed (with any one or
    # two, and three of the four triples, the simulation is exact to 1e-7); its row goes on
    # apart, and the classifier's per-tensor int8 range after pooling moves every sample a bit.
    from compressor.export import smoothing
    from compressor.export.smoothing import input_scales, smoothed_for_int8
    from compressor.export.stage import smoothing_batches

    # every input smoothed, whether or not that cuts its int8 error (`WORTH_SMOOTHING`)
    monkeypatch.setattr(smoothing, "WORTH_SMOOTHING", float("inf"))
    loaded, plan_, student = _student(kind, tmp_path)
    module = factorize(student, loaded.teacher, plan_).eval()
    batches = smoothing_batches(loaded)
    scales = input_scales(module, batches, 0.5)
    assert scales and all(s.dim() == 1 for s in scales.values())
    assert any(name.startswith("compact__") for name in scales)  # a factor's input too
    batch = loaded.held_out.take(torch.arange(16))
    export_onnx(smoothed_for_int8(module, batches, 0.5), batch, loaded.specs,
                tmp_path / "float.onnx", 18)
    quantize_int8(tmp_path / "float.onnx", tmp_path / "int8.onnx")
    int8 = [torch.from_numpy(a) for a in run_onnx(onnx_session(tmp_path / "int8.onnx"), batch)]
    with torch.no_grad():
        smoothed = run_outputs(SimulatedInt8(module, scales), batch)
        unsmoothed = run_outputs(SimulatedInt8(module), batch)
    for real, as_smoothed, as_unsmoothed in zip(int8, smoothed, unsmoothed, strict=True):
        assert _relative_l2(as_unsmoothed, real) > 1e-3
        if kind == "text":
            assert _relative_l2(as_smoothed, real) < 0.1 * _relative_l2(as_unsmoothed, real)
        else:
            assert _relative_l2(as_smoothed, real) < 1e-5


def test_smoothing_factors_for_weights_the_module_does_not_hold_are_refused(tmp_path):
    loaded, plan_, student = _student("mlp", tmp_path)
    module = factorize(student, loaded.teacher, plan_)
    with pytest.raises(ValueError, match="does not hold"):
        SimulatedInt8(module, {"no.such.weight": torch.ones(3)})


def test_fake_quantization_rounds_to_the_grid_and_passes_gradients_straight_through():
    weight = torch.tensor([[0.5, -1.27, 0.004], [2.0, 0.0, -0.01]], requires_grad=True)
    rounded = fake_int8_symmetric(weight, axis=0)
    scales = torch.tensor([[1.27 / 64], [2.0 / 64]])  # 7-bit weights: [-64, 64]
    assert torch.allclose(rounded, torch.round(weight.detach() / scales) * scales)
    rounded.sum().backward()
    assert torch.equal(weight.grad, torch.ones_like(weight))

    activation = torch.tensor([0.3, 1.0, 2.0])  # range [0, 2]: 0 is kept exactly
    on_grid = fake_uint8_asymmetric(activation)
    step = 2.0 / 255
    assert torch.allclose(on_grid, torch.round(activation / step) * step)
    assert fake_uint8_asymmetric(torch.zeros(3)).eq(0).all()


@pytest.mark.parametrize("tied", [True, False])
def test_rows_looked_up_are_rounded_on_their_tables_grid_as_the_rounded_tables_rows(tied):
    # The simulation rounds only the rows an embedding gathers, on the whole table's grid (a
    # tied table's uint8 one; an untied table's 4-bit blocks of 32 entries of a row, here a
    # row of 40: a block and a part): the same values and gradients as gathering from the
    # rounded table, without rounding it.
    table = torch.randn(50, 40, generator=torch.Generator().manual_seed(0)) * 3
    table[5, 32:] = 0.0  # an all-zero block: its scale 0, its values 0
    ids = torch.tensor([[3, 7, 7, 49], [0, 1, 2, 5]])
    whole, rows = table.clone().requires_grad_(True), table.clone().requires_grad_(True)
    rounded = fake_uint8_asymmetric(whole) if tied else fake_uint4_blocks(whole)
    expected = torch.nn.functional.embedding(ids, rounded)
    assert not torch.equal(rounded, table)
    with Int8Simulation([rows], shared=[rows] if tied else []):
        actual = torch.nn.functional.embedding(ids, rows)
    assert torch.equal(actual, expected)
    weights = torch.arange(actual.numel(), dtype=actual.dtype).reshape(actual.shape)
    (expected * weights).sum().backward()
    (actual * weights).sum().backward()
    assert torch.equal(rows.grad, whole.grad)


def test_the_compact_form_trains_the_students_own_theta(tmp_path):
    loaded, plan_, student = _student("conv", tmp_path)
    simulated, params = quantization_aware(student, loaded.teacher, plan_, train_biases=False)
    assert params and all(p.requires_grad for p in params)
    before = {entry.layer.name: [t.detach().clone() for t in theta_of(student, entry.layer.name)]
              for entry in plan_.compressed}
    with torch.no_grad():
        for param in params:
            param.add_(1.0)
    for name, thetas in before.items():
        for was, now in zip(thetas, theta_of(student, name), strict=True):
            assert torch.allclose(now.detach(), was + 1.0)  # same storage, not a copy


def test_a_tied_table_is_trained_once_through_both_its_uses(tmp_path):
    # GPT-2's table is read by the input's rows and by the head: two compact modules, one θ,
    # which AdamW must be given once (it refuses a parameter in two groups), and which trains.
    loaded, plan_, student = _student("gpt2", tmp_path)
    tied = [e.layer.name for e in plan_.compressed if e.layer.tied_embedding]
    assert tied
    simulated, params = quantization_aware(student, loaded.teacher, plan_, train_biases=False)
    assert len({id(p) for p in params}) == len(params)
    stored = {t.data_ptr() for entry in plan_.compressed
              for t in theta_of(student, entry.layer.name)}
    assert {p.data_ptr() for p in params} == stored
    optimizer = torch.optim.AdamW(parameter_groups(params, FinetuneConfig()))
    table = [p for p in params if p.data_ptr() in
             {t.data_ptr() for t in theta_of(student, tied[0])}]
    batch = loaded.train.take(torch.arange(4))
    run_outputs(simulated, batch)[0].square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in table)
    optimizer.step()


@pytest.mark.parametrize("smoothing", [None, 0.5])
def test_a_ratio_job_fine_tunes_through_int8_when_asked(tmp_path, smoothing):
    pt2 = make_pt2("text", tmp_path / "text.pt2")
    config = {**FACTORIZED, "export": {"form": "factorized", "quantize": "int8",
                                       "int8_smoothing": smoothing, "latency_seconds": 0},
              "finetune": {"steps": 6, "eval_every": 3, "quantization_aware": True},
              "data": {"synthetic_samples": 64}}
    result = compressor.compress(pt2, config, out_dir=tmp_path / "out")
    finetune = result.report["finetune"]
    assert finetune["quantization_aware"] is True
    assert finetune["best_score"] <= finetune["initial_score"]
    assert (tmp_path / "out" / "model.onnx").is_file()
    log = (tmp_path / "out" / "job.log").read_text()
    # the int8 model is smoothed as fine-tuning simulated it, not measured again
    said = re.findall(r"int8 smoothing: (\d+) MatMul inputs divided, by the factors "
                      r"quantization-aware fine-tuning simulated\n", log)
    assert len(said) == (0 if smoothing is None else 1)


@pytest.mark.parametrize("config, message", [
    ({"finetune": {"quantization_aware": True}}, "export.quantize 'int8'"),
    ({"finetune": {"quantization_aware": True}, "export": {"quantize": "int8"}},
     "export.form 'factorized'"),
    ({"finetune": {"quantization_aware": True}, "target": {}}, "target mode fine-tunes"),
])
def test_quantization_aware_fine_tuning_needs_an_int8_compact_export(config, message):
    with pytest.raises(ConfigError, match=message):
        CompressionConfig.parse(config)


def test_the_products_int8_leaves_convolutions_float_and_the_baselines_quantizes_them(tmp_path):
    # onnxruntime's ConvInteger is slow on CPU: the artifact keeps Conv float, while the
    # baseline (quantize_dynamic's defaults, what a user would run) quantizes it.
    import onnx

    loaded, plan_, student = _student("conv", tmp_path)
    module = factorize(student, loaded.teacher, plan_).eval()
    batch = loaded.held_out.take(torch.arange(4))
    export_onnx(module, batch, loaded.specs, tmp_path / "float.onnx", 18)
    quantize_int8(tmp_path / "float.onnx", tmp_path / "ours.onnx")
    quantize_int8(tmp_path / "float.onnx", tmp_path / "all.onnx", onnxruntime_defaults=True)

    def op_types(path):
        return {node.op_type for node in onnx.load(path).graph.node}

    ours, every = op_types(tmp_path / "ours.onnx"), op_types(tmp_path / "all.onnx")
    assert "Conv" in ours and "ConvInteger" not in ours and "MatMulInteger" in ours
    assert "ConvInteger" in every
