"""Block-wise distillation: each repeated block learns the original's, fed the original's input."""

import torch

import compressor
from compressor.finetune.blockwise import BlockwiseLoss
from compressor.rewrite.parametrize import theta_of
from tests.support.students import tiny_student
from tests.support.tiny_checkpoints import save_checkpoint, write_text
from tests.support.tiny_models import make_pt2

# every layer of the tiny decoder compressed alike: those in its 2 blocks and its head
UNIFORM = {"ratio": 0.5, "min_layer_params": 0, "allocation": "uniform",
           "data": {"max_length": 16}}


def _llama_student(tmp_path):
    return tiny_student("llama", tmp_path, UNIFORM)


def _thetas(student, plan_):
    return {entry.layer.name: theta_of(student, entry.layer.name) for entry in plan_.compressed}


def test_each_block_learns_from_the_originals_input_to_it_and_nothing_outside_blocks_learns(
        tmp_path):
    loaded, plan_, student = _llama_student(tmp_path)
    loss = BlockwiseLoss(student, loaded.teacher)
    assert loss.blocks == 2
    batch = loaded.train.take(torch.arange(4))
    thetas = _thetas(student, plan_)
    inside = {name for name in thetas if ".layers." in name}
    # the table and the head are compressed too, outside every block
    assert len(inside) == 14 and set(thetas) - inside == {"model.model.embed_tokens",
                                                           "model.lm_head"}
    value = loss(batch)
    assert value > 0
    for name, tensors in thetas.items():
        learned = any(t.grad is not None and t.grad.abs().sum() > 0 for t in tensors)
        assert learned == (name in inside), name
    # block 1's loss reads the original's input to it: block 0's θ moved far changes nothing
    # there, and the original itself has no loss at all
    segments = [s for s in loss.segments if s.block.endswith("layers.1")]
    values = loss._original_values(batch)
    before = float(sum(loss._segment_loss(s, values) for s in segments))
    with torch.no_grad():
        for name in inside:
            if ".layers.0." in name:
                for tensor in thetas[name]:
                    tensor.mul_(3.0)
    assert float(sum(loss._segment_loss(s, loss._original_values(batch))
                     for s in segments)) == before
    # the original against itself: each block, run on its own inputs, makes its own outputs
    assert float(BlockwiseLoss(loaded.teacher, loaded.teacher)(batch)) == 0.0


def test_a_job_distilled_block_wise_trains_its_blocks_and_says_so(tmp_path):
    folder = save_checkpoint("llama", tmp_path / "llama")
    data = write_text(tmp_path / "text.txt")
    config = {**UNIFORM, "export": {"latency_seconds": 0},
              "finetune": {"steps": 6, "eval_every": 3, "distill": "blocks"}}
    result = compressor.compress(folder, config, data=data, out_dir=tmp_path / "out")
    finetune = result.report["finetune"]
    assert finetune["blocks_distilled"] == 2 and finetune["distill_note"] is None
    assert not finetune["teacher_outputs_cached"]  # the original's logits are never needed
    assert finetune["best_score"] <= finetune["initial_score"]
    log = (tmp_path / "out" / "job.log").read_text()
    assert "each of its 2 blocks distilled on the original's (block-wise), peak learning rate " \
           "0.0003 × each tensor's RMS" in log  # a causal language model's rate
    assert finetune["relative_lr"] == 0.0003


def test_a_model_without_blocks_is_distilled_on_its_outputs_saying_why(tmp_path):
    pt2 = make_pt2("mlp", tmp_path / "mlp.pt2")
    config = {"ratio": 0.5, "min_layer_params": 0, "export": {"latency_seconds": 0},
              "finetune": {"steps": 3, "eval_every": 3, "distill": "blocks"}}
    result = compressor.compress(pt2, config, out_dir=tmp_path / "out")
    assert result.report["finetune"]["blocks_distilled"] == 0
    assert result.report["finetune"]["relative_lr"] == 0.005
    log = (tmp_path / "out" / "job.log").read_text()
    assert "the model has no repeated blocks (layers.0, layers.1, ...); distilled on its " \
           "outputs" in log
