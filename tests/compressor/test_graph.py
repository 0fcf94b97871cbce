"""The one graph stepper: values live until their last use, outputs as the module gives them."""

import torch

from compressor.runtime.graph import GraphStepper, last_uses, live_bytes, shallow_copy
from compressor.runtime.outputs import run_outputs
from tests.support.tiny_models import MODEL_CLASSES, example_inputs, make_pt2


def _text(tmp_path):
    module = torch.export.load(str(make_pt2("text", tmp_path / "text.pt2"))).module()
    return module, example_inputs(MODEL_CLASSES["text"](), batch=3, seed=2)


def test_stepping_every_node_gives_the_modules_outputs(tmp_path):
    module, batch = _text(tmp_path)
    stepper = GraphStepper(module, batch)
    with torch.no_grad():
        for node in stepper.nodes():
            stepper.step(node)
        stepped = stepper.outputs()
        expected = run_outputs(module, batch)
    assert len(stepped) == len(expected)
    for got, want in zip(stepped, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_value_is_dropped_right_after_its_last_use(tmp_path):
    module, batch = _text(tmp_path)
    freed = last_uses(module.graph)
    stepper = GraphStepper(module, batch)
    with torch.no_grad():
        for node in stepper.nodes():
            stepper.step(node)
            for done in freed.get(node, []):
                assert done not in stepper.env, done.name  # nothing later reads it
            if node.op != "placeholder" and node.users:
                assert node in stepper.env  # a value some later node reads is kept


def test_kept_values_survive_their_last_use(tmp_path):
    module, batch = _text(tmp_path)
    nodes = list(module.graph.nodes)
    kept = next(n for n in nodes if n.op == "call_function" and n.users)
    stepper = GraphStepper(module, batch, keep=[kept])
    with torch.no_grad():
        for node in stepper.nodes():
            stepper.step(node)
    assert kept in stepper.env


def test_the_live_bytes_peak_counts_activations_not_weights(tmp_path):
    module, batch = _text(tmp_path)
    one = {name: t[:1] for name, t in batch.items()}
    peak_one, outputs_one = live_bytes(module, one)
    peak_three, outputs_three = live_bytes(module, batch)
    weights = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    assert 0 < peak_one < peak_three <= 3 * peak_one + 1024  # grows with the batch
    assert outputs_three == 3 * outputs_one and peak_one < weights


def test_a_shallow_copy_shares_every_tensor_and_copies_the_graph(tmp_path):
    module, _ = _text(tmp_path)
    copied = shallow_copy(module)
    assert copied.graph is not module.graph
    originals = dict(module.named_parameters())
    for name, tensor in copied.named_parameters():
        assert tensor is originals[name]


def test_a_stop_keeps_its_own_inputs_and_frees_what_only_later_nodes_read():
    class TwoOutputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x):
            hidden = torch.relu(self.a(x))
            return hidden.sum(), self.b(hidden)  # hidden: read by sum, then by the stop

    module = torch.export.export(TwoOutputs(), (torch.randn(2, 4),)).module()
    nodes = {node.name: node for node in module.graph.nodes}
    stop = next(u for u in nodes["relu"].users if u.name != "sum_1")  # b's linear
    freed = last_uses(module.graph, stop)
    # relu's last use is the stop itself (not sum): it is still there when the stop runs
    assert nodes["relu"] in freed.get(stop, [])
    assert not any(nodes["relu"] in values for user, values in freed.items() if user is not stop)
