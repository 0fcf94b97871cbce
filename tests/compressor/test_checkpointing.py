"""Activation checkpointing of a model's blocks during fine-tuning: same numbers, less kept."""

import copy
import weakref

import pytest
import torch

from compressor.config import CompressionConfig
from compressor.finetune.activation_checkpointing import (
    BlockCheckpointing,
    block_of,
    saved_activation_bytes,
    segments,
    wanted,
)
from compressor.finetune.loop import (
    Distillation,
    FinetuneSummary,
    HeldOut,
    finetune_,
    training_forward,
)
from compressor.load.data import Dataset
from compressor.load.huggingface import load_checkpoint
from compressor.methods import available_methods
from compressor.plan.layers import find_layers
from compressor.plan.planning import plan_layers
from compressor.rewrite.parametrize import parametrize_, trainable_parameters
from compressor.runtime.outputs import run_outputs
from compressor.runtime.progress import JobControl
from tests.support.tiny_checkpoints import VOCAB_SIZE, save_checkpoint
from tests.support.tiny_models import MODEL_CLASSES, example_inputs, make_pt2

BLOCKS = ["model.model.layers.0", "model.model.layers.1"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The original program of a two-layer Llama checkpoint, as the pipeline loads it."""
    root = tmp_path_factory.mktemp("llama")
    return load_checkpoint(save_checkpoint("llama", root / "ck"), root / "work", 16).program


def _student(program, method="lowrank"):
    teacher = program.module()
    student = copy.deepcopy(teacher)
    plan = plan_layers(*find_layers(student), CompressionConfig(method=method, ratio=0.5))
    parametrize_(student, plan, {}, "sum")
    return teacher, student, plan


def _tokens(count: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB_SIZE, (count, 16), generator=generator)
    mask = torch.ones(count, 16, dtype=torch.long)
    mask[0, 12:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_a_block_is_a_module_path_up_to_its_first_index():
    assert block_of("model.layers.3.mlp.up_proj") == "model.layers.3"
    assert block_of("encoder.layer.11") == "encoder.layer.11"
    assert block_of("model.norm") == ""
    assert block_of("") == ""


def test_each_block_is_one_segment_and_reads_its_weights_itself(llama):
    _, student, plan = _student(llama)
    runs = segments(student.graph)
    assert [run.block for run in runs if run.block] == BLOCKS
    for run in runs:
        reads = {node.target for node in run.nodes if node.op == "get_attr"}
        inside = {name for name in reads if name.startswith(run.block + ".")}
        assert reads == inside or not run.block  # no block reads another's weights
    q_proj = "model.model.layers.0.self_attn.q_proj.weight"
    assert any(q_proj in {n.target for n in run.nodes} for run in runs if run.block == BLOCKS[0])


@pytest.mark.parametrize("method", available_methods())
def test_checkpointed_blocks_compute_the_same_outputs_and_theta_gradients(llama, method):
    _, student, plan = _student(llama, method)
    params = trainable_parameters(student, plan, train_biases=False)
    runner = BlockCheckpointing(student)
    assert runner.blocks == BLOCKS
    batch = _tokens(3)

    def gradients(forward):
        for param in params:
            param.grad = None
        outputs = forward(batch)
        sum(output.pow(2).sum() for output in outputs).backward()
        return [o.detach() for o in outputs], [param.grad.clone() for param in params]

    plain_outputs, plain_grads = gradients(lambda b: run_outputs(student, b))
    outputs, grads = gradients(runner)
    assert all(torch.equal(a, b) for a, b in zip(outputs, plain_outputs, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads, strict=True))


def test_checkpointed_blocks_keep_none_of_their_activations_for_backward(llama):
    _, student, plan = _student(llama)
    trainable_parameters(student, plan, train_biases=False)
    batch = _tokens(4)
    plain = saved_activation_bytes(lambda b: run_outputs(student, b), batch, student)
    kept = saved_activation_bytes(BlockCheckpointing(student), batch, student)
    # What remains is outside the blocks (embedding, final norm, logits); the blocks' inputs,
    # which checkpointing keeps, are not saved tensors and are not counted here.
    assert 0 < kept < plain / 5


def _finetune(program, checkpointing: str, steps: int = 3):
    teacher, student, plan = _student(program)
    config = CompressionConfig.parse({"finetune": {
        "steps": steps, "batch_size": 4, "eval_every": 2, "lr": 1e-2,
        "activation_checkpointing": checkpointing}}).finetune
    train = Dataset(_tokens(8, seed=1), False, "test")
    held_out = Dataset(_tokens(4, seed=2), False, "test")
    lesson = Distillation(teacher, ["logits"], train, HeldOut.of(teacher, held_out, 64))
    summary = finetune_(student, plan, lesson, config, JobControl())
    return summary, [p.detach() for p in trainable_parameters(student, plan, False)]


def test_fine_tuning_with_checkpointing_trains_theta_as_without(llama):
    plain, plain_theta = _finetune(llama, "off")
    summary, theta = _finetune(llama, "on")
    assert summary.activation_checkpointing and not plain.activation_checkpointing
    assert summary.best_step == plain.best_step > 0
    for entry, want in zip(summary.history, plain.history, strict=True):
        assert entry == pytest.approx(want, rel=1e-5)  # the loss is summed in chunks
    for got, want in zip(theta, plain_theta, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("free", "expected"), [(1, True), (10**15, False)])
def test_auto_checkpoints_when_a_steps_activations_would_not_fit(llama, monkeypatch, free,
                                                                   expected):
    monkeypatch.setattr("compressor.finetune.loop.free_memory_bytes", lambda device: free)
    summary, _ = _finetune(llama, "auto", steps=1)
    assert summary.activation_checkpointing is expected
    assert summary.activation_bytes_per_step > 0
    # Checkpointed, a step holds about one block's activations and the blocks' inputs (2 /
    # blocks of a plain step's) rather than them all; its 4 × outputs either way.
    activations = summary.activation_bytes_per_step
    kept = 2 * activations // len(BLOCKS) if expected else activations
    outputs = sum(t.nbytes for t in run_outputs(llama.module(), _tokens(4)))
    assert summary.step_bytes == kept + 4 * outputs
    if expected:  # and with 1 byte free, no step fits: skipped, saying so
        assert summary.skipped and not summary.history


def test_the_rule_counts_activations_theta_gradients_and_adam_moments():
    assert not wanted(40, 10, 200)  # 40 + 3 × 10 = 70 ≤ 100
    assert wanted(80, 10, 200)  # 110 > 100
    assert not wanted(10**12, 10, None)  # free memory unknown: as configured, not guessed


def test_a_model_without_blocks_trains_without_checkpointing(tmp_path):
    teacher = torch.export.load(str(make_pt2("mlp", tmp_path / "mlp.pt2"))).module()
    student = copy.deepcopy(teacher)
    plan = plan_layers(*find_layers(student), CompressionConfig(ratio=0.5))
    parametrize_(student, plan, {}, "sum")
    assert not BlockCheckpointing(student).blocks
    config = CompressionConfig.parse({"finetune": {
        "steps": 2, "batch_size": 4, "activation_checkpointing": "on"}}).finetune
    data = Dataset(example_inputs(MODEL_CLASSES["mlp"](), batch=8), False, "test")
    lesson = Distillation(teacher, ["regression"], data, HeldOut.of(teacher, data, 64))
    summary = finetune_(student, plan, lesson, config, JobControl())
    assert not summary.activation_checkpointing and len(summary.history) == 1


def test_a_steps_activations_are_predicted_from_one_sample_and_two(llama):
    teacher, student, plan = _student(llama)
    params = trainable_parameters(student, plan, train_biases=False)
    config = CompressionConfig.parse({"finetune": {"batch_size": 6}}).finetune
    summary = FinetuneSummary(1, "cpu", 0.0, 0.0, 0, samples_per_step=6)
    training_forward(student, Dataset(_tokens(8), False, "test"), config, torch.device("cpu"),
                     params, summary)
    measured = saved_activation_bytes(lambda b: run_outputs(student, b), _tokens(6), student)
    # θ's products W = f(θ) are kept once per step, whatever the batch: not times the batch.
    assert summary.activation_bytes_per_step == pytest.approx(measured, rel=0.02)
    outputs = sum(t.numel() * t.element_size() for t in run_outputs(student, _tokens(6)))
    assert summary.step_bytes == summary.activation_bytes_per_step + 4 * outputs


def test_measuring_a_steps_activations_keeps_none_of_them():
    layer = torch.nn.Linear(64, 64, bias=False)
    freed = []

    def forward(batch):
        hidden = layer(batch["x"])  # the product saves the input, for the weight's gradient
        alive = weakref.ref(hidden)
        out = hidden.sin()  # saves hidden, for its own gradient
        del hidden
        freed.append(alive() is None)
        return [out]

    x = torch.randn(8, 64)
    assert saved_activation_bytes(forward, {"x": x}, layer) == 2 * x.nbytes
    assert freed == [True]  # held by nothing: sin's saved input is a placeholder
