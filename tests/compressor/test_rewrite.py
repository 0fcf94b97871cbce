"""Rewrite, materialize and factorize a real program's graph: every form computes the same."""

import copy

import onnxruntime as ort
import pytest
import torch

from compressor.config import CompressionConfig
from compressor.export.onnx import export_onnx
from compressor.load.data import input_specs
from compressor.plan.calibration import collect_layer_stats
from compressor.plan.layers import find_layers
from compressor.plan.planning import plan_layers
from compressor.rewrite.forms import factorize, materialize
from compressor.rewrite.parametrize import parametrize_
from compressor.runtime.outputs import run_outputs
from tests.support.tiny_models import MODEL_CLASSES, example_inputs, make_pt2


def rewritten(kind, tmp_path, **config):
    program = torch.export.load(str(make_pt2(kind, tmp_path / f"{kind}.pt2")))
    teacher = program.module()
    config = CompressionConfig.parse(config)
    plan = plan_layers(*find_layers(teacher), config)
    student = copy.deepcopy(teacher)
    parametrize_(student, plan, {}, config.finetune.grad_reduction)
    return program, teacher, student, plan


def test_find_layers_sees_every_linear_and_conv_by_module_name(tmp_path):
    program = torch.export.load(str(make_pt2("conv", tmp_path / "conv.pt2")))
    layers, skipped = find_layers(program.module())
    assert [(layer.name, layer.kind) for layer in layers] == [
        ("conv1", "conv2d"), ("conv2", "conv2d"), ("head", "linear")]
    conv2 = layers[1]
    assert conv2.stride == (2, 2) and conv2.padding == (1, 1) and conv2.weight_shape == (32, 16, 3, 3)
    assert skipped == []


@pytest.mark.parametrize("kind", ["mlp", "conv", "text"])
def test_materialized_and_factorized_forms_equal_the_parametrized_model(tmp_path, kind):
    _, teacher, student, plan = rewritten(kind, tmp_path, ratio=0.3, min_layer_params=0)
    assert plan.compressed
    inputs = example_inputs(MODEL_CLASSES[kind](), batch=3)
    with torch.no_grad():
        expected = run_outputs(student, inputs)
        dense = materialize(student, teacher, plan)
        factorized = factorize(student, teacher, plan)
        for form in (dense, factorized, student):
            for got, want in zip(run_outputs(form, inputs), expected, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The dense form keeps the original parameter names; the factorized one drops the weights.
    names = {n for n, _ in dense.named_parameters()}
    assert all(f"{p.layer.name}.weight" in names for p in plan.compressed)
    factorized_names = {n for n, _ in factorized.named_parameters()}
    assert not any(f"{p.layer.name}.weight" in factorized_names for p in plan.compressed)


@pytest.mark.parametrize("kind", ["mlp", "text"])
def test_a_layer_the_plan_exports_dense_gets_its_w_in_the_compact_form(tmp_path, kind):
    # objective latency exports a layer dense where that was measured faster: W = f(θ) made
    # once, in the original's graph, beside the other layers' compact modules
    from dataclasses import replace

    _, teacher, student, plan = rewritten(kind, tmp_path, ratio=0.3, min_layer_params=0)
    first, *rest = [p.layer.name for p in plan.compressed]
    assert rest
    mixed = factorize(student, teacher, replace(plan, dense_exports=frozenset({first})))
    inputs = example_inputs(MODEL_CLASSES[kind](), batch=3)
    with torch.no_grad():
        for got, want in zip(run_outputs(mixed, inputs), run_outputs(student, inputs),
                             strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mixed.get_parameter(f"{first}.weight"),
                                   student.get_submodule(first).weight)
    names = {n for n, _ in mixed.named_parameters()}
    assert not any(f"{name}.weight" in names for name in rest)
    compact = {n for n, _ in mixed.named_children() if n.startswith("compact__")}
    assert compact == {"compact__" + name.replace(".", "__") for name in rest}


def test_only_theta_is_trainable_after_the_rewrite(tmp_path):
    _, _, student, plan = rewritten("mlp", tmp_path, min_layer_params=0)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    expected = {f"{p.layer.name}.parametrizations.weight.original{i}"
                for p in plan.compressed for i in (0, 1)}
    assert trainable == expected


def test_activation_aware_stats_are_gram_matrices_of_the_layer_inputs(tmp_path):
    program = torch.export.load(str(make_pt2("mlp", tmp_path / "mlp.pt2")))
    module = program.module()
    layers, _ = find_layers(module)
    batch = example_inputs(MODEL_CLASSES["mlp"](), batch=6)
    stats = collect_layer_stats(module, layers, [batch])
    x = batch["x"].double()
    torch.testing.assert_close(stats["fc1"].gram, x.T @ x)
    assert stats["fc1"].rows == 6


@pytest.mark.parametrize("form", ["dense", "factorized"])
def test_onnx_export_matches_pytorch(tmp_path, form):
    program, teacher, student, plan = rewritten("text", tmp_path, ratio=0.4)
    module = (factorize if form == "factorized" else materialize)(student, teacher, plan)
    sample = example_inputs(MODEL_CLASSES["text"](), batch=2)
    export_onnx(module, sample, input_specs(program), tmp_path / "m.onnx", 18,
                optimize=form == "dense")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    inputs = example_inputs(MODEL_CLASSES["text"](), batch=5, seed=9)
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    with torch.no_grad():
        want = run_outputs(module, inputs)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(torch.from_numpy(g), w, rtol=1e-4, atol=1e-5)
