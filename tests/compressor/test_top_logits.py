"""Distillation on a language model's top-k next tokens (`compressor.runtime.top_logits`)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import compressor
from compressor.config import CompressionConfig
from compressor.finetune import loop
from compressor.finetune.loop import Distillation, HeldOut, finetune_
from compressor.load.data import Dataset
from compressor.plan.planning import Plan
from compressor.runtime.objectives import (
    KL_TEMPERATURE,
    distillation_backward,
    distillation_loss,
)
from compressor.runtime.progress import JobControl
from compressor.runtime.top_logits import AUTO_TOP_K, TopKOutputs, TopLogits, top_logits_kl
from tests.support.tiny_checkpoints import save_checkpoint, write_text


def logits(*shape: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def coarse_kl(student: torch.Tensor, teacher: torch.Tensor, k: int, t: float) -> torch.Tensor:
    """KL over the teacher's top k classes and one outcome for the rest, written out."""
    p, q = (teacher / t).softmax(-1).double(), (student / t).softmax(-1).double()
    top = p.topk(k, dim=-1).indices
    p_top, q_top = p.gather(-1, top), q.gather(-1, top)
    p_all = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], -1)
    q_all = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], -1)
    return (p_all * (p_all / q_all).log()).sum() * t**2


def test_the_loss_is_the_kl_over_the_top_k_and_one_outcome_for_the_rest() -> None:
    teacher, student = logits(12, 50), logits(12, 50, seed=1)
    target = TopLogits.of(teacher, 8, KL_TEMPERATURE)
    assert target.indices.shape == (12, 8) and target.rest.shape == (12,)
    assert target.indices.dtype == torch.int32 and target.nbytes == 12 * (8 * (4 + 4) + 4)
    expected = coarse_kl(student, teacher, 8, KL_TEMPERATURE)
    assert float(top_logits_kl(student, target)) == pytest.approx(float(expected), rel=1e-5)


def test_it_never_exceeds_the_full_kl_and_reaches_it_when_the_rest_has_no_mass() -> None:
    teacher, student = logits(12, 50), logits(12, 50, seed=1)
    full = F.kl_div((student / KL_TEMPERATURE).log_softmax(-1),
                    (teacher / KL_TEMPERATURE).log_softmax(-1), log_target=True,
                    reduction="sum") * KL_TEMPERATURE**2
    partial = top_logits_kl(student, TopLogits.of(teacher, 8, KL_TEMPERATURE))
    assert 0 < float(partial) < float(full)
    peaked = teacher.clone()
    peaked[:, 5:] -= 1000  # the teacher puts all its mass on the first 5 classes
    full = F.kl_div((student / KL_TEMPERATURE).log_softmax(-1),
                    (peaked / KL_TEMPERATURE).log_softmax(-1), log_target=True,
                    reduction="sum") * KL_TEMPERATURE**2
    exact = top_logits_kl(student, TopLogits.of(peaked, 5, KL_TEMPERATURE))
    assert float(exact) == pytest.approx(float(full), rel=1e-5)


def test_a_student_equal_to_the_teacher_has_no_loss_and_no_gradient() -> None:
    teacher = logits(6, 40)
    student = teacher.clone().requires_grad_()
    loss = top_logits_kl(student, TopLogits.of(teacher, 4, KL_TEMPERATURE))
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0, abs=1e-5)
    assert float(student.grad.abs().max()) < 1e-5


def test_chunked_backpropagation_gives_the_same_loss_and_gradient_as_one_pass() -> None:
    teacher = logits(3, 10, 40)
    target = TopKOutputs(16, (True,), KL_TEMPERATURE).compact([teacher])
    assert isinstance(target[0], TopLogits)
    weight = logits(40, 40, seed=2, scale=0.2).requires_grad_()
    hidden = logits(3, 10, 40, seed=3)
    whole = distillation_loss([hidden @ weight], target, ["logits"])
    whole.backward()
    expected = weight.grad.clone()
    weight.grad = None
    chunked = distillation_backward([hidden @ weight], target, ["logits"], chunk_values=80)
    assert float(chunked) == pytest.approx(float(whole.detach()), rel=1e-6)
    torch.testing.assert_close(weight.grad, expected, rtol=1e-5, atol=1e-7)
    # Without a gradient (held-out scoring) the chunked sum is the same too.
    with torch.no_grad():
        assert float(distillation_loss([hidden @ weight], target, ["logits"])) == pytest.approx(
            float(whole.detach()), rel=1e-6)


def test_targets_select_and_concatenate_by_sample_as_the_outputs_do() -> None:
    teacher = logits(4, 6, 30)
    target = TopLogits.of(teacher, 5, KL_TEMPERATURE)
    index = torch.tensor([2, 0])
    picked = target[index]
    torch.testing.assert_close(picked.log_probs,
                               TopLogits.of(teacher[index], 5, KL_TEMPERATURE).log_probs)
    joined = TopLogits.cat([target[:1], target[1:]])
    assert torch.equal(joined.indices, target.indices) and joined.nbytes == target.nbytes


def test_the_original_is_kept_on_the_training_split_when_its_top_k_fit(monkeypatch) -> None:
    """The cache is sized by what is kept: outputs too large whole fit as their top k."""
    torch.manual_seed(0)  # a toy language model: token ids to (batch, positions, 300) logits
    batch = torch.export.Dim("batch")
    teacher = torch.export.export(torch.nn.Embedding(300, 300),
                                  (torch.zeros(2, 8, dtype=torch.int64),),
                                  dynamic_shapes=({0: batch},)).module()
    train = Dataset({"input": torch.randint(0, 300, (40, 8))}, synthetic=True, source="synthetic")
    held_out = HeldOut.of(teacher, train, 8, TopKOutputs(16, (True,), KL_TEMPERATURE))
    whole = 8 * 300 * 4  # bytes of one sample's logits
    monkeypatch.setattr(loop, "_TEACHER_CACHE_BYTES", len(train) * whole // 2)
    cached = loop._teacher_targets(teacher, train, torch.device("cpu"), held_out)
    kept = cached.take(torch.arange(40))[0]
    assert isinstance(kept, TopLogits) and kept.indices.shape == (40, 8, 16)
    with torch.no_grad():
        expected = TopLogits.of(teacher(train.inputs["input"]), 16, KL_TEMPERATURE)
    torch.testing.assert_close(kept.log_probs, expected.log_probs)
    whole_outputs = HeldOut.of(teacher, train, 8)  # no top k: too large to keep
    assert loop._teacher_targets(teacher, train, torch.device("cpu"), whole_outputs) is None


@pytest.mark.parametrize(("setting", "next_token", "classes", "k"), [
    ("auto", True, 32_000, AUTO_TOP_K),  # a language model's vocabulary
    ("auto", True, 96, None),  # a tiny vocabulary: kept whole
    ("auto", False, 32_000, None),  # not next-token logits (a masked LM, a classifier)
    (16, True, 96, 16),
    (200, True, 96, None),  # k not below the classes: the whole distribution
    (None, True, 32_000, None),
])
def test_which_outputs_are_kept_as_their_top_k(setting, next_token, classes, k) -> None:
    assert TopKOutputs(setting, (next_token,), KL_TEMPERATURE).k_for(0, classes) == k


@pytest.mark.slow
def test_a_language_models_job_distills_on_the_top_k_without_running_the_original_each_step(
    tmp_path, monkeypatch
) -> None:
    folder = save_checkpoint("llama", tmp_path / "llama")
    config = {"ratio": 0.5, "min_layer_params": 0, "export": {"latency_seconds": 0},
              "data": {"max_length": 16},
              "finetune": {"steps": 6, "eval_every": 3, "logits_top_k": 16}}
    result = compressor.compress(folder, config, data=write_text(tmp_path / "lines.txt"),
                                 out_dir=tmp_path / "out")
    summary = result.report["finetune"]
    assert summary["logits_top_k"] == 16 and summary["teacher_outputs_cached"]
    assert summary["best_score"] <= summary["initial_score"]
    log = (tmp_path / "out" / "job.log").read_text()
    assert "distilled on the original's top 16" in log


def test_a_step_whose_outputs_are_larger_than_a_chunk_backpropagates_the_loss_in_chunks(
    monkeypatch
) -> None:
    """A language model's logits: the loss's softmaxes are not held over the whole batch."""
    from compressor.runtime import objectives

    chunked = []
    real = loop.distillation_backward

    def spy(*args, **kwargs):
        chunked.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "distillation_backward", spy)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 40))

    def exported():
        return torch.export.export(model, (torch.zeros(2, 8),),
                                   dynamic_shapes=({0: torch.export.Dim("batch")},)).module()

    teacher, student = exported(), exported()
    data = Dataset({"input": torch.randn(16, 8)}, synthetic=True, source="synthetic")
    config = CompressionConfig.parse({"finetune": {"steps": 2, "batch_size": 8}}).finetune
    plan = Plan(layers=(), skipped=(), budget=1.0, layer_ratio=1.0)
    params = [student.get_parameter("1.weight")]
    monkeypatch.setattr(loop, "trainable_parameters", lambda *args: params)
    lesson = Distillation(teacher, ["logits"], data, HeldOut.of(teacher, data, 8))
    finetune_(student, plan, lesson, config, JobControl())
    assert not chunked  # 8 × 40 logits: one pass
    monkeypatch.setattr(objectives, "_CHUNK_VALUES", 100)
    finetune_(student, plan, lesson, config, JobControl())
    assert chunked == [True, True]


def test_held_out_logits_too_large_to_hold_go_to_disk_and_score_the_same(
        monkeypatch, tmp_path) -> None:
    """A language model's held-out logits (128 MiB a window of Gemma-3's) are kept on disk a
    batch at a time once their top k are the targets: the same scores and fidelity, the folder
    gone with the split."""
    import gc

    from compressor.finetune.stage import fidelity
    from compressor.runtime.spill import SpilledTensors

    torch.manual_seed(0)
    batch = torch.export.Dim("batch")
    teacher = torch.export.export(torch.nn.Embedding(300, 300),
                                  (torch.zeros(2, 8, dtype=torch.int64),),
                                  dynamic_shapes=({0: batch},)).module()
    torch.manual_seed(1)
    student = torch.export.export(torch.nn.Embedding(300, 300),
                                  (torch.zeros(2, 8, dtype=torch.int64),),
                                  dynamic_shapes=({0: batch},)).module()
    data = Dataset({"input": torch.randint(0, 300, (12, 8))}, synthetic=True, source="synthetic")
    top_k = TopKOutputs(16, (True,), KL_TEMPERATURE)
    in_memory = HeldOut.of(teacher, data, 4, top_k)
    monkeypatch.setattr(loop, "_HELD_OUT_MEMORY_BYTES", 12 * 8 * 300 * 4 - 1)  # just too large
    on_disk = HeldOut.of(teacher, data, 4, top_k, spill=tmp_path)
    assert isinstance(on_disk.reference, SpilledTensors) and len(on_disk.reference) == 3
    assert sorted(p.name for p in on_disk.reference.folder.iterdir()) == [
        f"batch{i}_output0.npy" for i in range(3)]
    assert isinstance(in_memory.reference, list)  # no folder given: held, whatever the size
    for kept, spilled in zip(in_memory.reference, on_disk.reference, strict=True):
        torch.testing.assert_close(spilled[0], kept[0], rtol=0, atol=0)
    kinds = ["logits"]
    assert fidelity(student, on_disk, kinds) == fidelity(student, in_memory, kinds)
    moved = on_disk.to(torch.device("cpu"))
    assert isinstance(moved.reference, SpilledTensors)
    torch.testing.assert_close(moved.reference[2][0], in_memory.reference[2][0], rtol=0, atol=0)
    folder = on_disk.reference.folder
    del on_disk
    gc.collect()
    assert folder.is_dir() and len(moved.reference) == 3  # a view keeps the files
    del moved
    gc.collect()
    assert not folder.exists()
    # targets kept whole (no top k) stay in memory: spilling them would save nothing
    whole = HeldOut.of(teacher, data, 4, None, spill=tmp_path)
    assert isinstance(whole.reference, list) and whole.targets is whole.reference
    # ... unless nothing trains on them (target mode's search only scores against them)
    scored = HeldOut.of(teacher, data, 4, None, spill=tmp_path, for_training=False)
    assert isinstance(scored.reference, SpilledTensors) and scored.targets is scored.reference
    assert fidelity(student, scored, kinds) == fidelity(student, whole, kinds)


def test_held_out_logits_the_disk_cannot_take_are_refused_before_any_is_written(
        monkeypatch, tmp_path) -> None:
    from compressor.errors import ResourceError

    batch = torch.export.Dim("batch")
    teacher = torch.export.export(torch.nn.Embedding(300, 300),
                                  (torch.zeros(2, 8, dtype=torch.int64),),
                                  dynamic_shapes=({0: batch},)).module()
    data = Dataset({"input": torch.randint(0, 300, (12, 8))}, synthetic=True, source="synthetic")
    top_k = TopKOutputs(16, (True,), KL_TEMPERATURE)
    monkeypatch.setattr(loop, "_HELD_OUT_MEMORY_BYTES", 0)
    needed = 12 * 8 * 300 * 4  # three batches of 4 windows, 8 positions, 300 logits
    monkeypatch.setattr(loop, "free_disk_bytes", lambda folder: needed - 1)
    with pytest.raises(ResourceError) as refused:
        HeldOut.of(teacher, data, 4, top_k, spill=tmp_path)
    assert refused.value.code == "insufficient_resources"
    assert "data.holdout_fraction" in refused.value.message
    assert list(tmp_path.iterdir()) == []  # nothing written
    monkeypatch.setattr(loop, "free_disk_bytes", lambda folder: needed)
    assert len(HeldOut.of(teacher, data, 4, top_k, spill=tmp_path).reference) == 3
