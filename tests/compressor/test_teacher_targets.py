"""The original's training targets: made when a step first draws a sample, the same batches
whatever ran before."""

import torch

from compressor.config import CompressionConfig
from compressor.finetune import loop
from compressor.finetune.loop import Distillation, HeldOut, finetune_
from compressor.finetune.teacher_targets import TeacherTargets, first_drawn, sampled_indices
from compressor.load.data import Dataset
from compressor.plan.layers import find_layers
from compressor.plan.planning import plan_layers
from compressor.rewrite.parametrize import parametrize_
from compressor.runtime.graph import shallow_copy
from compressor.runtime.progress import JobControl
from tests.support.tiny_models import MODEL_CLASSES, example_inputs, make_pt2


def _batch_dependent(runs: list[list[int]]):
    """A stand-in for the original whose output for a sample depends on its batchmates (as a
    float kernel's rounding can): the sample's index plus the batch's sum."""
    def run(index: torch.Tensor) -> list[torch.Tensor]:
        runs.append(index.tolist())
        return [(index + index.sum()).double().unsqueeze(-1).repeat(1, 3)]
    return run


def test_the_samples_a_step_first_draws_are_made_together_once_and_the_same_after_a_resume():
    draws = torch.tensor([[3, 1, 3], [1, 4, 0], [5, 2, 4]])
    assert first_drawn(7, draws).tolist()[:6] == [1, 0, 2, 0, 1, 2]
    probe = [torch.zeros(1, 3, dtype=torch.float64)]
    runs: list[list[int]] = []
    targets = TeacherTargets(_batch_dependent(runs), 7, probe, chunk=64)
    in_order = [targets.take(step)[0] for step in draws]
    assert runs == [[1, 3], [0, 4], [2, 5]]  # each step's new samples, once, together
    assert targets.made == 6
    # a run resumed after the second step has no kept targets: told what the steps before it
    # drew, it makes sample 4 in the batch the second step made it in, then the step's new ones
    resumed_runs: list[list[int]] = []
    resumed = TeacherTargets(_batch_dependent(resumed_runs), 7, probe, chunk=64)
    resumed.drawn_before(draws[:2])
    assert torch.equal(resumed.take(draws[2])[0], in_order[2])
    assert resumed_runs == [[0, 4], [2, 5]]
    # a batch larger than the chunk runs a chunk at a time
    chunked: list[list[int]] = []
    TeacherTargets(_batch_dependent(chunked), 7, probe, chunk=1).take(draws[0])
    assert chunked == [[1], [3]]


def test_the_schedule_is_what_the_runs_sampler_draws(tmp_path, monkeypatch):
    """A run of a few steps runs the original on the samples its steps draw, not the split."""
    teacher = torch.export.load(str(make_pt2("mlp", tmp_path / "mlp.pt2"))).module()
    student = shallow_copy(teacher)
    config = CompressionConfig.parse({"ratio": 0.3, "finetune": {
        "steps": 3, "eval_every": 3, "batch_size": 4, "loss": "regression"}})
    plan = plan_layers(*find_layers(teacher), config)
    parametrize_(student, plan, {}, "sum")
    data = Dataset(example_inputs(MODEL_CLASSES["mlp"](), batch=64), False, "test")
    drawn, made = [], []
    real_take, real_run = TeacherTargets.take, loop.run_outputs
    monkeypatch.setattr(TeacherTargets, "take", lambda self, index: drawn.append(index) or
                        real_take(self, index))
    lesson = Distillation(teacher, ["regression"], data, HeldOut.of(teacher, data, 64))
    monkeypatch.setattr(loop, "run_outputs", lambda module, batch: (
        made.append(next(iter(batch.values())).shape[0]) if module is teacher else None)
        or real_run(module, batch))
    summary = finetune_(student, plan, lesson, config.finetune, JobControl(print))
    assert summary.steps_run == 3 and summary.teacher_outputs_cached
    schedule = sampled_indices(64, 3, 4, config.finetune.seed)
    assert [s.tolist() for s in drawn] == [s.tolist() for s in schedule]
    # the probe's sample, then each step's samples not drawn before: far fewer than 64
    assert made == [1] + [len(set(s.tolist()) - {i for p in schedule[:n] for i in p.tolist()})
                          for n, s in enumerate(schedule)]
    assert sum(made) - 1 == len(schedule.unique()) < 64
