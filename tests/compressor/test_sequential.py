"""Sequential correction: each lowrank layer re-fitted on the compressed model's own inputs."""

import copy

import torch

from compressor.config import CompressionConfig
from compressor.methods import LayerStats, get_method
from compressor.methods.lowrank.sequential import _LayerFit, correct_second_factor_
from compressor.plan.calibration import collect_layer_stats
from compressor.plan.layers import find_layers, layer_calls
from compressor.plan.planning import plan_layers
from compressor.rewrite import sequential
from compressor.rewrite.parametrize import parametrize_
from compressor.rewrite.sequential import correct_sequentially_
from compressor.runtime.layers import InputMoments
from compressor.runtime.objectives import distillation_loss
from compressor.runtime.outputs import run_outputs
from tests.support.tiny_models import MODEL_CLASSES, example_inputs, make_pt2


def test_correction_brings_the_outputs_closer_and_leaves_the_original_alone(tmp_path):
    teacher = torch.export.load(str(make_pt2("text", tmp_path / "text.pt2"))).module()
    config = CompressionConfig.parse({"ratio": 0.4, "min_layer_params": 0,
                                      "allocation": "uniform"})
    plan = plan_layers(*find_layers(teacher), config)
    batch = example_inputs(MODEL_CLASSES["text"](), batch=48, seed=1)
    stats = collect_layer_stats(teacher, [p.layer for p in plan.compressed], [batch])
    lowrank = get_method("lowrank")
    for entry in plan.compressed:
        weight = teacher.get_submodule(entry.layer.name).weight.detach()
        stats.setdefault(entry.layer.name, LayerStats(None)).prepared = lowrank.factorize(
            entry.layer, weight, stats[entry.layer.name])
    student = copy.deepcopy(teacher)
    parametrize_(student, plan, stats, config.finetune.grad_reduction)
    original_state = copy.deepcopy(teacher.state_dict())
    kinds = ["logits", "embedding"]
    with torch.no_grad():
        reference = run_outputs(teacher, batch)
        before = float(distillation_loss(run_outputs(student, batch), reference, kinds))
        gains = correct_sequentially_(student, teacher, plan, batch)
        after = float(distillation_loss(run_outputs(student, batch), reference, kinds))
    corrected = {p.layer.name for p in plan.compressed if p.layer.kind != "embedding"}
    assert set(gains) == corrected and all(0 <= g <= 1 for g in gains.values())
    assert after < before
    for name, tensor in teacher.state_dict().items():
        torch.testing.assert_close(tensor, original_state[name], rtol=0, atol=0)
    # Held-out inputs gain too: the correction generalizes, it does not memorize the batch.
    probe = example_inputs(MODEL_CLASSES["text"](), batch=48, seed=9)
    uncorrected = copy.deepcopy(teacher)
    parametrize_(uncorrected, plan, stats, config.finetune.grad_reduction)
    with torch.no_grad():
        want = run_outputs(teacher, probe)
        assert (float(distillation_loss(run_outputs(student, probe), want, kinds))
                < float(distillation_loss(run_outputs(uncorrected, probe), want, kinds)))


def test_the_fit_works_from_moments_without_forming_outputs():
    torch.manual_seed(0)
    x = torch.randn(600, 12)
    x_student = x + 0.1 * torch.randn(600, 12)
    W = torch.randn(5000, 12)  # more output rows than one chunk: the accumulation is pinned too
    A, B = torch.randn(5000, 3), torch.randn(3, 12)
    moments = InputMoments.of(x, x_student)
    torch.testing.assert_close(moments.cross, x.double().T @ x_student.double(),
                               rtol=1e-12, atol=1e-9)
    fit = _LayerFit.of(A, W)
    X, Xs, W64, A64 = x.double(), x_student.double(), W.double(), A.double()
    direct = (Xs @ (A64 @ B.double()).T - X @ W64.T).pow(2).sum()
    torch.testing.assert_close(fit.squared_error(B, moments, fit.reference(moments)), direct,
                               rtol=1e-9, atol=0)
    # The closed form of SVD-LLM's update: B = (AᵀA)⁻¹ Aᵀ W C (G' + λI)⁻¹.
    gram = moments.student_gram
    damped = gram + 1e-3 * gram.diagonal().mean() * torch.eye(12, dtype=torch.float64)
    expected = torch.linalg.lstsq(A64, W64 @ moments.cross @ torch.linalg.inv(damped)).solution
    torch.testing.assert_close(fit.best_second_factor(moments), expected, rtol=1e-7, atol=1e-9)


def test_both_models_stop_at_the_last_corrected_layer(tmp_path, monkeypatch):
    teacher = torch.export.load(str(make_pt2("text", tmp_path / "text.pt2"))).module()
    config = CompressionConfig.parse({"ratio": 0.4, "min_layer_params": 0,
                                      "allocation": "uniform", "method": "lowrank"})
    plan = plan_layers(*find_layers(teacher), config)
    student = copy.deepcopy(teacher)
    parametrize_(student, plan, {}, config.finetune.grad_reduction)
    ran: list[str] = []
    step = sequential.GraphStepper.step
    monkeypatch.setattr(sequential.GraphStepper, "step",
                        lambda self, node: (ran.append(node.name), step(self, node))[1])
    batch = example_inputs(MODEL_CLASSES["text"](), batch=4, seed=1)
    gains = correct_sequentially_(student, teacher, plan, batch)
    order = {node.name: i for i, node in enumerate(student.graph.nodes)}
    last_call = max(order[node.name] for node in student.graph.nodes
                    if layer_calls(student).get(node) in gains)
    assert gains and ran and all(order[name] < last_call for name in ran)  # nothing after it
    # every node before it that computes, once per model; weights are read as their nodes need
    # them (the student's once for every batch, not stepped)
    computing = [node for node in list(student.graph.nodes)[:last_call]
                 if node.op != "get_attr"]
    assert max(order[name] for name in ran) == order[computing[-1].name]
    assert len(ran) == 2 * len(computing)


def test_any_method_with_a_sequential_update_is_corrected_through_its_hook(tmp_path):
    """The driver names no method: a method whose θ is one tensor gets its moments too."""
    from dataclasses import replace

    from compressor.methods import method_class

    calls: list[tuple[str, int, tuple[int, int]]] = []

    class CorrectedTieRows(method_class("tie_rows")):
        @property
        def corrects_sequentially(self) -> bool:
            return True

        def correct_(self, layer, theta, weight, moments, check=None):
            calls.append((layer.name, len(theta), tuple(moments.cross.shape)))
            return 1.0

    teacher = torch.export.load(str(make_pt2("text", tmp_path / "text.pt2"))).module()
    config = CompressionConfig.parse({"ratio": 0.5, "min_layer_params": 0,
                                      "allocation": "uniform", "method": "tie_rows"})
    plan = plan_layers(*find_layers(teacher), config)
    method = CorrectedTieRows()
    plan = replace(plan, layers=tuple(replace(p, method=method) for p in plan.layers))
    student = copy.deepcopy(teacher)
    parametrize_(student, plan, {}, config.finetune.grad_reduction)
    batch = example_inputs(MODEL_CLASSES["text"](), batch=4, seed=1)
    gains = correct_sequentially_(student, teacher, plan, batch)
    linear = [p.layer for p in plan.compressed if not p.layer.spec.reads_rows]
    assert linear and gains == {layer.name: 1.0 for layer in linear}
    assert sorted(calls) == sorted((layer.name, 1, (layer.in_features, layer.in_features))
                                   for layer in linear)


class _FakeLayer:
    """What `factorize` reads of a layer: nothing but the weight it is given."""


def _rank_6_of_a_random_layer() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seed the generator; return a random 40 × 12 W and its best rank-6 factors A, B."""
    torch.manual_seed(0)
    W = torch.randn(40, 12)
    factors = get_method("lowrank").factorize(_FakeLayer, W, None)
    return W, factors.first(6).clone(), factors.second(6).clone()


def test_a_refit_that_fits_its_rows_but_not_others_is_refused():
    # The fitting rows see the student's inputs doubled, the checking rows as they are: the
    # refit halves B, exact on the rows it was fitted on and wrong on the others. It is refused.
    W, A, B = _rank_6_of_a_random_layer()
    x, x_check = torch.randn(300, 12), torch.randn(300, 12)
    fit, check = InputMoments.of(x, 2 * x), InputMoments.of(x_check, x_check)
    kept = B.clone()
    gain = correct_second_factor_(A, B, W, fit, check)
    assert gain == 1.0
    torch.testing.assert_close(B, kept, rtol=0, atol=0)
    # Unchecked, the same refit is taken (it fits its own rows better).
    assert correct_second_factor_(A, B, W, fit) < 1.0
    assert not torch.equal(B, kept)


def test_a_refit_that_holds_on_the_checking_rows_is_made_again_on_all_rows():
    W, A, B = _rank_6_of_a_random_layer()
    x, x_check = torch.randn(300, 12), torch.randn(100, 12)
    shift = torch.randn(12, 12) * 0.2  # what upstream compression does to the inputs
    fit, check = InputMoments.of(x, x + x @ shift), InputMoments.of(x_check, x_check + x_check @ shift)
    gain = correct_second_factor_(A, B, W, fit, check)
    assert 0 < gain < 1
    both = InputMoments.of(torch.cat([x, x_check]), torch.cat([x + x @ shift, x_check + x_check @ shift]))
    expected = _LayerFit.of(A, W).best_second_factor(both)
    torch.testing.assert_close(B.double(), expected, rtol=1e-5, atol=1e-6)


def test_several_batches_run_in_lockstep_and_the_last_checks(tmp_path):
    """Each layer's moments add up over the fitting batches; every fourth batch, counted from
    the last, checks instead; one weight product is made once for all batches."""
    from compressor.methods import method_class

    seen: list[tuple[str, InputMoments, InputMoments | None]] = []

    class Recorded(method_class("lowrank")):
        def correct_(self, layer, theta, weight, moments, check=None):
            seen.append((layer.name, moments, check))
            return 1.0  # θ unchanged: both models' inputs stay the original's up to each layer

    teacher = torch.export.load(str(make_pt2("text", tmp_path / "text.pt2"))).module()
    config = CompressionConfig.parse({"ratio": 0.5, "min_layer_params": 0,
                                      "allocation": "uniform"})
    plan = plan_layers(*find_layers(teacher), config)
    from dataclasses import replace
    plan = replace(plan, layers=tuple(replace(p, method=Recorded()) for p in plan.layers))
    student = copy.deepcopy(teacher)
    parametrize_(student, plan, {}, config.finetune.grad_reduction)
    batches = [example_inputs(MODEL_CLASSES["text"](), batch=3, seed=s) for s in range(5)]
    assert sequential.checking_batches(5) == {4, 0}
    gains = correct_sequentially_(student, teacher, plan, batches)
    assert gains and all(g == 1.0 for g in gains.values())
    name, fit, check = seen[0]
    layer = next(p.layer for p in plan.compressed if p.layer.name == name)
    fitting = collect_layer_stats(student, [layer], batches[1:4])[name].gram
    checking = collect_layer_stats(student, [layer], [batches[0], batches[4]])[name].gram
    torch.testing.assert_close(fit.student_gram, fitting.double(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(check.student_gram, checking.double(), rtol=1e-9, atol=1e-9)
    assert sequential.checking_batches(1) == set()
    assert sequential.checking_batches(2) == {1}


def _tied_decoder(layers: int, samples: int):
    """Return a tiny tied-head decoder (the original), its plan at ratio 0.5 (every layer, the
    tied table included), a parametrized student of it, and `samples` × 16 token ids."""
    from tests.support.corpus_programs import TinyLlama, exported_decoder

    torch.manual_seed(0)
    model = TinyLlama(vocab=96, dim=32, layers=layers, tied=True).eval()
    ids = torch.randint(0, 96, (samples, 16), generator=torch.Generator().manual_seed(1))
    teacher = exported_decoder(model, ids).module()
    config = CompressionConfig.parse({"ratio": 0.5, "min_layer_params": 0,
                                      "allocation": "uniform"})
    plan = plan_layers(*find_layers(teacher), config)
    student = copy.deepcopy(teacher)
    parametrize_(student, plan, {}, config.finetune.grad_reduction)
    return teacher, plan, student, ids


def test_a_tied_head_is_not_refitted():
    """Its table is the input embedding every corrected layer upstream was fitted on."""
    teacher, plan, student, ids = _tied_decoder(layers=1, samples=8)
    assert any(p.layer.tied_embedding for p in plan.compressed)
    gains = correct_sequentially_(student, teacher, plan, [{"input_ids": ids[:4]},
                                                           {"input_ids": ids[4:]}])
    assert gains and "lm_head" not in gains


def test_lockstep_batches_share_one_product_of_a_tied_table_and_drop_it_after_the_lookup(
        monkeypatch):
    """A parametrized weight read is W = f(θ), a new tensor: a tied table's product (as large as
    the table) is made once for all batches, and freed after the input embedding reads it, not
    held for the head the correction never runs (it held one copy per batch, all of them to the
    end: 8 × 671 MB on Gemma-3 270M)."""
    import weakref

    teacher, plan, student, ids = _tied_decoder(layers=2, samples=12)
    tied = next(p.layer.name for p in plan.compressed if p.layer.tied_embedding)
    products: list[weakref.ref] = []
    student.get_submodule(tied).parametrizations.weight.register_forward_hook(
        lambda module, args, out: products.append(weakref.ref(out)))
    alive_at_each_layer: list[int] = []
    moments = sequential._moments

    def recorded(pairs, *args):
        alive_at_each_layer.append(sum(ref() is not None for ref in products))
        return moments(pairs, *args)

    monkeypatch.setattr(sequential, "_moments", recorded)
    gains = correct_sequentially_(student, teacher, plan,
                                  [{"input_ids": ids[i:i + 3]} for i in range(0, 12, 3)])
    assert gains and len(products) == 1  # one product for the four batches
    assert alive_at_each_layer and not any(alive_at_each_layer)  # none held past the lookup
