"""Fine-tuning pieces: learning rates, the device, and the copy the CUDA path trains."""

import copy
import math
from dataclasses import asdict

import pytest
import torch

from compressor.config import CompressionConfig
from compressor.errors import ConfigError
from compressor.finetune.device import copy_back_, on_device, resolve_device
from compressor.finetune.loop import (
    Distillation,
    HeldOut,
    finetune_,
    parameter_groups,
    samples_per_step,
    time_left,
)
from compressor.load.data import Dataset
from compressor.methods import available_methods, method_class
from compressor.plan.layers import find_layers
from compressor.plan.planning import plan_layers
from compressor.rewrite.parametrize import parametrize_, trainable_parameters
from compressor.runtime.graph import shallow_copy
from compressor.runtime.outputs import run_outputs
from compressor.runtime.progress import JobControl
from tests.support.tiny_models import MODEL_CLASSES, example_inputs, make_pt2


def test_asking_for_cuda_without_one_says_what_to_do():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="use 'auto' or 'cpu'"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


# Every method that compresses the conv model's Conv2d layers.
@pytest.mark.parametrize("method", [name for name in available_methods()
                                    if "conv2d" in method_class(name).layer_kinds])
def test_the_device_copies_compute_the_same_share_the_model_and_train_their_own_theta(
        tmp_path, method):
    program = torch.export.load(str(make_pt2("conv", tmp_path / "conv.pt2")))
    teacher = program.module()
    config = CompressionConfig(method=method, ratio=0.4)
    plan = plan_layers(*find_layers(teacher), config)
    student = shallow_copy(teacher)  # as the pipeline makes it
    parametrize_(student, plan, {}, config.finetune.grad_reduction)
    teacher_copy, moved = on_device(teacher, student, torch.device("cpu"))
    batch = example_inputs(MODEL_CLASSES["conv"](), batch=3)
    with torch.no_grad():
        for got, want in zip(run_outputs(moved, batch), run_outputs(student, batch), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # One copy of the model: what teacher and student share here, their copies share there.
    own = {n for n, t in student.state_dict(keep_vars=True).items()
           if all(t is not u for u in teacher.state_dict(keep_vars=True).values())}
    assert own and all(".parametrizations.weight." in n or n.endswith(".bias") for n in own)
    copies, teacher_copies = moved.state_dict(keep_vars=True), teacher_copy.state_dict(keep_vars=True)
    for name, tensor in student.state_dict(keep_vars=True).items():
        assert copies[name] is not tensor
        assert (copies[name] is teacher_copies.get(name)) == (name not in own)
    trainable = [n for n, p in moved.named_parameters() if p.requires_grad]
    assert trainable and trainable == [n for n, p in student.named_parameters() if p.requires_grad]
    before = {k: v.clone() for k, v in student.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in teacher_copy.state_dict().items()}
    run_outputs(moved, batch)[0].sum().backward()
    with torch.no_grad():
        for param in moved.parameters():
            if param.grad is not None:
                param -= 0.1 * param.grad
    for key, value in student.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)  # the student is untouched
    for key, value in teacher_copy.state_dict().items():
        torch.testing.assert_close(value, teacher_before[key], rtol=0, atol=0)
    copy_back_(student, teacher, moved)  # what the pipeline does after training
    with torch.no_grad():
        for got, want in zip(run_outputs(moved, batch), run_outputs(student, batch), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_device_copies_graphs_make_their_constants_on_that_device(tmp_path):
    from compressor.load.huggingface import load_checkpoint
    from tests.support.tiny_checkpoints import save_checkpoint

    program = load_checkpoint(save_checkpoint("llama", tmp_path / "ck"), tmp_path / "work",
                              16).program  # makes positions and masks with arange(device=cpu)
    teacher = program.module()
    student = shallow_copy(teacher)
    plan = plan_layers(*find_layers(teacher), CompressionConfig(ratio=0.5))
    parametrize_(student, plan, {}, "sum")
    meta = torch.device("meta")
    for module in on_device(teacher, student, meta):
        assert all(t.device == meta for t in module.state_dict().values())
        devices = {n.kwargs["device"] for n in module.graph.nodes if "device" in n.kwargs}
        assert devices == {meta}
        batch = {"input_ids": torch.ones(2, 16, dtype=torch.long, device=meta),
                 "attention_mask": torch.ones(2, 16, dtype=torch.long, device=meta)}
        assert all(out.device == meta for out in run_outputs(module, batch))


def test_train_biases_adds_the_compressed_layers_biases_and_nothing_else(tmp_path):
    from compressor.rewrite.parametrize import trainable_parameters

    program = torch.export.load(str(make_pt2("mlp", tmp_path / "mlp.pt2")))
    student = copy.deepcopy(program.module())
    config = CompressionConfig(ratio=0.3)
    plan = plan_layers(*find_layers(student), config)
    parametrize_(student, plan, {}, config.finetune.grad_reduction)
    trainable_parameters(student, plan, train_biases=True)
    names = {n for n, p in student.named_parameters() if p.requires_grad}
    compressed = {p.layer.name for p in plan.compressed}
    assert names == {f"{name}.{suffix}" for name in compressed
                     for suffix in ("bias", "parametrizations.weight.original0",
                                    "parametrizations.weight.original1")}


def test_default_learning_rates_follow_each_tensors_scale():
    small, large = torch.nn.Parameter(torch.full((4, 4), 0.02)), torch.nn.Parameter(torch.full((3,), 2.0))
    groups = parameter_groups([small, large], CompressionConfig().finetune)
    assert [g["lr"] for g in groups] == pytest.approx([0.005 * 0.02, 0.005 * 2.0])
    fixed = parameter_groups([small, large], CompressionConfig.parse({"finetune": {"lr": 1e-3}}).finetune)
    assert len(fixed) == 1 and fixed[0]["lr"] == 1e-3
    # a causal language model's default is lower; a rate given is the rate taken
    language = parameter_groups([small, large], CompressionConfig().finetune, language_model=True)
    assert [g["lr"] for g in language] == pytest.approx([0.0003 * 0.02, 0.0003 * 2.0])
    given = CompressionConfig.parse({"finetune": {"relative_lr": 0.01}}).finetune
    assert [g["lr"] for g in parameter_groups([small], given, language_model=True)] == (
        pytest.approx([0.01 * 0.02]))


def test_the_fidelity_pass_scores_the_student_as_fine_tuning_does(tmp_path):
    from compressor.finetune.loop import held_out_score
    from compressor.finetune.stage import fidelity
    from compressor.load.data import Dataset

    teacher = torch.export.load(str(make_pt2("text", tmp_path / "text.pt2"))).module()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    held_out = Dataset(example_inputs(MODEL_CLASSES["text"](), batch=10, seed=4), False, "test")
    kinds = ["logits", "embedding"]
    split = HeldOut.of(teacher, held_out, 4)
    _, score = fidelity(student, split, kinds)
    assert score == pytest.approx(held_out_score(student, split, kinds), rel=1e-6)


def test_the_originals_own_figures_are_read_off_its_held_out_outputs_as_a_pass_gives_them(
        tmp_path):
    # a student that compresses no layer (target mode's int8 of the original) is the original:
    # scoring it needs no pass, its outputs are the held-out reference
    from compressor.finetune.stage import fidelity
    from compressor.load.data import Dataset

    teacher = torch.export.load(str(make_pt2("text", tmp_path / "text.pt2"))).module()
    held_out = Dataset(example_inputs(MODEL_CLASSES["text"](), batch=10, seed=4), False, "test")
    kinds = ["logits", "embedding"]
    split = HeldOut.of(teacher, held_out, 4)
    read, read_score = fidelity(None, split, kinds)
    run, run_score = fidelity(teacher, split, kinds)
    assert read_score == pytest.approx(0.0, abs=1e-7)
    assert run_score == pytest.approx(0.0, abs=1e-7)
    for read_figures, run_figures in zip(read, run, strict=True):  # a pass runs in float32
        assert asdict(read_figures) == pytest.approx(asdict(run_figures), abs=1e-6)
    assert [(f.cosine, f.relative_l2, f.top1_agreement) for f in read] == [
        (pytest.approx(1.0), 0.0, 1.0), (pytest.approx(1.0), 0.0, None)]


@pytest.mark.parametrize("free_thetas", [4.3, 4.6])
def test_steps_that_would_not_fit_in_free_memory_are_skipped_saying_why(
        tmp_path, monkeypatch, free_thetas):
    teacher = torch.export.load(str(make_pt2("mlp", tmp_path / "mlp.pt2"))).module()
    student = shallow_copy(teacher)
    config = CompressionConfig.parse({"ratio": 0.5, "finetune": {"steps": 2, "batch_size": 4}})
    plan = plan_layers(*find_layers(teacher), config)
    parametrize_(student, plan, {}, "sum")
    params = trainable_parameters(student, plan, train_biases=False)
    theta_bytes = sum(p.numel() * p.element_size() for p in params)
    # Gradients, AdamW's two moments and the best θ: 4 × θ, in 90 % of the free memory (this
    # model has no blocks, so no activations are measured).
    monkeypatch.setattr("compressor.finetune.loop.free_memory_bytes",
                        lambda device: int(free_thetas * theta_bytes))
    before = [p.detach().clone() for p in params]
    data = Dataset(example_inputs(MODEL_CLASSES["mlp"](), batch=8), False, "test")
    events = []
    lesson = Distillation(teacher, ["regression"], data, HeldOut.of(teacher, data, 64))
    summary = finetune_(student, plan, lesson, config.finetune, JobControl(events.append))
    messages = [event.message for event in events if event.stage == "finetuning"]
    if free_thetas < 4 / 0.9:
        assert summary.skipped and "finetune.steps 0" in summary.skipped
        assert "2 steps need about" in summary.skipped and summary.history == []
        assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    else:
        assert summary.skipped is None and len(summary.history) == 1
        assert messages[0].startswith("step 1/2, about ") and messages[0].endswith(" left")
        assert messages[1] == "step 2/2"


def test_each_steps_progress_says_about_how_long_the_rest_will_take():
    assert time_left(30.0, 1, 301) == ", about 2.5 h left"  # 300 more steps of 30 s
    assert time_left(10.0, 2, 8) == ", about 30 s left"
    assert time_left(90.0, 3, 5) == ", about 1.0 min left"
    assert time_left(90.0, 5, 5) == ""  # done


@pytest.mark.parametrize(("setting", "device", "length", "expected"), [
    ("auto", "cpu", 128, (8, 1024)),  # 1,024 tokens a step on the CPU: 8 windows of 128
    ("auto", "cuda", 128, (32, 4096)),  # no limit on CUDA: batch_size
    ("auto", "cpu", 16, (32, 512)),  # short windows: batch_size is the smaller
    (100, "cpu", 128, (1, 128)),  # one sample at least
    (None, "cpu", 128, (32, 4096)),
])
def test_a_step_on_text_takes_at_most_tokens_per_step(setting, device, length, expected):
    config = CompressionConfig.parse({"finetune": {"tokens_per_step": setting}}).finetune
    text = Dataset({"input_ids": torch.ones(40, length, dtype=torch.int64),
                    "attention_mask": torch.ones(40, length, dtype=torch.int64)}, False, "test")
    assert samples_per_step(config, text, torch.device(device)) == expected
    pictures = Dataset({"x": torch.ones(40, 3, 8, 8)}, False, "test")  # not text: batch_size
    assert samples_per_step(config, pictures, torch.device(device)) == (32, None)


def test_the_learning_rates_cosine_ends_where_the_schedule_says():
    from compressor.finetune.loop import FinetuneSummary, _schedule

    config = CompressionConfig.parse({"finetune": {"steps": 100, "warmup_steps": 10}}).finetune
    summary = FinetuneSummary(100, "cpu", 0.0, 0.0, 0, schedule_steps=100)
    factor = _schedule(config, summary)
    assert factor(0) == pytest.approx(1 / 11) and factor(10) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(0.5) and factor(100) == pytest.approx(0.0, abs=1e-12)
    summary.schedule_steps = 40  # a time budget will stop the run at step 40
    assert factor(25) == pytest.approx(0.5) and factor(40) == pytest.approx(0.0, abs=1e-12)


def test_the_learning_rate_warms_up_again_after_a_roll_back():
    from compressor.finetune.loop import FinetuneSummary, _schedule

    config = CompressionConfig.parse({"finetune": {"steps": 100, "warmup_steps": 10}}).finetune
    summary = FinetuneSummary(100, "cpu", 0.0, 0.0, 0, schedule_steps=100)
    factor = _schedule(config, summary)
    before = [factor(step) for step in range(101)]
    summary.history += [{"step": 25, "held_out": 1.0},
                        {"step": 50, "held_out": 2.0, "backoff": "rolled back to step 25"}]
    after = [factor(step) for step in range(101)]
    assert after[:50] == before[:50] and after[60:] == before[60:]
    # the step after the roll-back starts the warm-up again, as step 1 did
    assert after[50] == pytest.approx(before[50] / 11)
    assert after[59] == pytest.approx(before[59] * 10 / 11)


def test_the_step_after_a_roll_back_runs_at_the_halved_rate_warming_up(tmp_path, monkeypatch):
    teacher = torch.export.load(str(make_pt2("mlp", tmp_path / "mlp.pt2"))).module()
    student = shallow_copy(teacher)
    config = CompressionConfig.parse({"ratio": 0.3, "finetune": {
        "steps": 8, "lr": 1.0, "warmup_steps": 2, "eval_every": 4, "batch_size": 8,
        "loss": "regression"}})
    plan = plan_layers(*find_layers(teacher), config)
    parametrize_(student, plan, {}, "sum")
    data = Dataset(example_inputs(MODEL_CLASSES["mlp"](), batch=16), False, "test")
    rates = []
    step = torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    lesson = Distillation(teacher, ["regression"], data, HeldOut.of(teacher, data, 64))
    summary = finetune_(student, plan, lesson, config.finetune, JobControl(print))
    assert "backoff" in summary.history[0]  # an lr of 1.0 wrecks θ by step 4
    cosine = [0.5 * (1 + math.cos(math.pi * (s - 2) / 6)) for s in range(8)]
    assert rates[:4] == pytest.approx([1 / 3, 2 / 3, cosine[2], cosine[3]])
    # step 5, the first after the roll-back: half the rate, a third of it (warm-up step 1 of 3)
    assert rates[4] == pytest.approx(0.5 * cosine[4] / 3)
    assert rates[5] == pytest.approx(0.5 * cosine[5] * 2 / 3)


def test_a_lesson_with_a_floor_check_ends_at_the_first_best_evaluation_that_keeps_it(tmp_path):
    from compressor.finetune.checkpoints import FinetuneCheckpoints
    from compressor.finetune.loop import FloorCheck
    from compressor.finetune.stage import fidelity

    teacher = torch.export.load(str(make_pt2("mlp", tmp_path / "mlp.pt2"))).module()
    config = CompressionConfig.parse({"ratio": 0.3, "finetune": {
        "steps": 40, "eval_every": 5, "batch_size": 8, "loss": "regression"}})
    plan = plan_layers(*find_layers(teacher), config)
    data = Dataset(example_inputs(MODEL_CLASSES["mlp"](), batch=16), False, "test")
    held_out = HeldOut.of(teacher, data, 64)

    def trained(kept, checkpoints=None):
        student = shallow_copy(teacher)
        parametrize_(student, plan, {}, "sum")
        lesson = Distillation(teacher, ["regression"], data, held_out,
                              None if kept is None else FloorCheck(None, kept))
        return student, finetune_(student, plan, lesson, config.finetune, JobControl(print),
                                  checkpoints=checkpoints)

    _, everything = trained(None)
    improving = [e["step"] for e in everything.history if e["held_out"] < everything.initial_score]
    assert everything.steps_run == 40 and everything.floor_kept_at is None and improving
    judged = []  # the relative L2 each best evaluation was judged by; the second keeps the floor

    def kept(figures):
        judged.append(figures[0].relative_l2)
        return len(judged) == 2

    def kept_run():
        return FinetuneCheckpoints(tmp_path / "run", "key", 1000, 600, print)

    student, summary = trained(kept, kept_run())
    stop = summary.floor_kept_at
    assert stop is not None and stop < 40 and summary.steps_run == stop == summary.best_step
    assert summary.history[-1]["step"] == stop
    assert summary.history[-1]["note"] == "floor kept: fine-tuning ends here"
    # the θ kept is the one the floor was judged on
    assert fidelity(student, held_out, ["regression"])[0][0].relative_l2 == pytest.approx(
        judged[-1], rel=1e-6)
    # a retry reuses the finished run, and says where it ended
    _, retried = trained(kept, kept_run())
    assert retried.resumed_at_step == stop and retried.floor_kept_at == stop
