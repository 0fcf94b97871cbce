"""Report figures: each layer's errors, computed from input moments, match the direct ones."""

import copy

import torch

from compressor.config import CompressionConfig
from compressor.finetune.layer_errors import layer_errors
from compressor.plan.layers import find_layers, run_recording
from compressor.plan.planning import plan_layers
from compressor.rewrite.parametrize import parametrize_
from tests.support.tiny_models import MODEL_CLASSES, example_inputs, make_pt2


def test_layer_output_errors_equal_those_of_the_output_rows(tmp_path):
    teacher = torch.export.load(str(make_pt2("text", tmp_path / "text.pt2"))).module()
    config = CompressionConfig.parse({"ratio": 0.4, "min_layer_params": 0,
                                      "allocation": "uniform", "method": "lowrank"})
    plan = plan_layers(*find_layers(teacher), config)
    student = copy.deepcopy(teacher)
    parametrize_(student, plan, {}, config.finetune.grad_reduction)
    batch = example_inputs(MODEL_CLASSES["text"](), batch=6, seed=2)
    errors = layer_errors(teacher, student, plan, batch)

    direct = {}

    def record(layer, x):
        dense = teacher.get_submodule(layer.name).weight.detach().double()
        approx = student.get_submodule(layer.name).weight.detach().double()
        if layer.kind == "embedding":
            ids = x.reshape(-1)
            ref, out = dense[ids], approx[ids]
        else:
            rows = layer.spec.input_rows(layer, x.double())
            ref = rows @ dense.reshape(dense.shape[0], -1).T
            out = rows @ approx.reshape(approx.shape[0], -1).T
        direct[layer.name] = float((out - ref).norm() / ref.norm())

    with torch.no_grad():
        run_recording(teacher, [p.layer for p in plan.compressed], batch, record)
    assert set(errors) == set(direct) and any(p.layer.kind == "embedding" for p in plan.compressed)
    for name, error in direct.items():
        assert abs(errors[name]["relative_output_error"] - error) < 1e-9 * max(1.0, error)
