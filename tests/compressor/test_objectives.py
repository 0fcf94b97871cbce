"""Output kinds and the loss that fits each: logits, embeddings, other floats, ignored outputs."""

import pytest
import torch
from torch import nn

from compressor.errors import ConfigError
from compressor.runtime import outputs
from compressor.runtime.objectives import detect_output_kinds, distillation_loss, output_loss
from compressor.runtime.outputs import FidelityMeter, call, run_outputs


class _Heads(nn.Module):
    """A classifier's logits, a pooled embedding, a per-sample score and an id output."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.head = nn.Linear(8, 5)
        self.score = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor):
        hidden = torch.relu(self.body(x))
        logits = self.head(hidden)
        return logits, hidden / hidden.norm(dim=1, keepdim=True).clamp(min=1e-6), \
            self.score(hidden).squeeze(1), logits.argmax(1)


class _Named(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor):
        return {"sentence_embedding": self.proj(x), "logits": self.proj(x) * 2}


def _program_module(model: nn.Module):
    x = torch.randn(4, 6)
    batch = torch.export.Dim("batch")
    return torch.export.export(model.eval(), (x,), dynamic_shapes=({0: batch},)).module(), {"x": x}


@pytest.mark.parametrize(("model", "setting", "expected"), [
    (_Heads, "auto", ["logits", "embedding", "regression", "ignored"]),
    # A name says more than a shape: this "embedding" comes straight from a Linear.
    (_Named, "auto", ["embedding", "logits"]),
    (_Heads, "embedding", ["embedding", "embedding", "embedding", "ignored"]),
    (_Heads, {"output_0": "regression"}, ["regression", "embedding", "regression", "ignored"]),
])
def test_output_kinds_come_from_names_and_the_graph_unless_the_job_says(model, setting, expected):
    module, batch = _program_module(model())
    kinds = detect_output_kinds(module, call(module, {"x": batch["x"]}),
                                run_outputs(module, batch), setting)
    assert kinds == expected


def test_a_loss_setting_for_an_output_that_does_not_exist_is_refused():
    module, batch = _program_module(_Heads())
    with pytest.raises(ConfigError, match=r"output_7.*outputs are"):
        detect_output_kinds(module, call(module, batch), run_outputs(module, batch),
                            {"output_7": "logits"})


@pytest.mark.parametrize("kind", ["logits", "embedding", "regression"])
def test_each_loss_is_zero_on_a_match_positive_otherwise_and_scale_free(kind):
    target, noise = torch.randn(16, 5), torch.randn(16, 5)
    assert float(output_loss(target, target, kind)) == pytest.approx(0, abs=1e-5)
    assert float(output_loss(target + 0.1 * noise, target, kind)) > 1e-4
    if kind != "logits":  # a softmax is not scale-free, and should not be
        small = output_loss(target + 0.1 * noise, target, kind)
        large = output_loss(1000 * (target + 0.1 * noise), 1000 * target, kind)
        torch.testing.assert_close(small, large, rtol=1e-4, atol=0)


def test_an_embedding_loss_sees_direction_and_a_logits_loss_sees_the_softmax():
    target = torch.randn(16, 5)
    # Same direction, other length: only the MSE part of the embedding loss sees it.
    longer = output_loss(target * 1.1, target, "embedding")
    assert float(longer) == pytest.approx(float(output_loss(target * 1.1, target, "regression")),
                                          rel=1e-4)
    # A constant shift leaves the softmax alone: the logits loss is only its MSE part.
    shifted = output_loss(target + 1.0, target, "logits")
    assert float(shifted) == pytest.approx(float(output_loss(target + 1.0, target, "regression")),
                                           rel=1e-4)


def test_ignored_outputs_add_nothing():
    logits, ids = torch.randn(8, 5), torch.arange(8)
    loss = distillation_loss([logits, ids], [logits, ids + 1], ["logits", "ignored"])
    assert float(loss) == pytest.approx(0, abs=1e-6)


def test_fidelity_reports_top1_for_logits_only():
    meter = FidelityMeter(["logits", "embedding"])
    logits, embedding = torch.randn(10, 4), torch.randn(10, 3)
    meter.add([logits, embedding * 2], [logits, embedding])
    result = meter.result()
    assert result[0].top1_agreement == 1.0 and result[1].top1_agreement is None
    assert result[1].cosine == pytest.approx(1.0) and result[1].kind == "embedding"


def test_fidelity_of_integer_and_half_precision_outputs_is_computed_wider():
    ids = torch.tensor([[3, 1, 2], [0, 5, 4]])
    half = torch.randn(4, 6).half()
    meter = FidelityMeter(["ignored", "embedding"])
    meter.add([ids, half], [ids + 1, half])
    counts, vectors = meter.result()
    expected = float(((ids + 1) - ids).double().norm() / (ids + 1).double().norm())
    assert counts.relative_l2 == pytest.approx(expected, rel=1e-12)
    assert vectors.cosine == pytest.approx(1.0, abs=1e-6) and vectors.relative_l2 == 0


def test_top1_of_sequence_logits_counts_each_position_once():
    reference = torch.zeros(2, 3, 5)  # batch × sequence × vocabulary
    reference[..., 0] = 1.0  # token 0 everywhere
    output = reference.clone()
    output[0, 1, 4] = 2.0  # one position of six disagrees
    meter = FidelityMeter(["logits"])
    meter.add([output], [reference])
    assert meter.result()[0].top1_agreement == pytest.approx(5 / 6)


def test_fidelity_is_the_same_whatever_the_chunking(monkeypatch):
    torch.manual_seed(0)
    reference = torch.randn(3, 50, 7)
    output = reference + 0.3 * torch.randn(3, 50, 7)
    whole = FidelityMeter(["logits"])
    whole.add([output], [reference])
    monkeypatch.setattr(outputs, "_VALUES_PER_CHUNK", 16)
    chunked = FidelityMeter(["logits"])
    chunked.add([output], [reference])
    a, b = whole.result()[0], chunked.result()[0]
    assert (a.top1_agreement, a.cosine) == pytest.approx((b.top1_agreement, b.cosine), rel=1e-12)
    assert a.relative_l2 == pytest.approx(b.relative_l2, rel=1e-12)


def test_next_token_figures_count_text_followed_by_text_and_do_not_depend_on_chunking(
        monkeypatch):
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(2, 5, 7, generator=generator)
    output = reference + 0.5 * torch.randn(2, 5, 7, generator=generator)
    ids = torch.randint(0, 7, (2, 5), generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])  # right padding: 4 + 2 next tokens
    batch = {"input_ids": ids, "attention_mask": mask}
    log_p = output[:, :-1].double().log_softmax(-1)
    log_q = reference[:, :-1].double().log_softmax(-1)
    kept = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    target = ids[:, 1:, None]
    nll = -log_p.gather(2, target)[kept].mean()
    reference_nll = -log_q.gather(2, target)[kept].mean()
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)[kept].mean()
    agreement = (log_p.argmax(-1) == log_q.argmax(-1))[kept].double().mean()
    results = []
    for chunk in (1 << 21, 10):  # whole, then one or two positions at a time
        monkeypatch.setattr(outputs, "_VALUES_PER_CHUNK", chunk)
        meter = FidelityMeter(["logits", "embedding"], [True, False])
        meter.add([output, reference[:, 0]], [reference, reference[:, 0]], batch)
        results.append(meter.result())
    for lm, embedding in results:
        assert lm.next_tokens == 6
        # each position's figures in float32, summed over positions in float64
        assert lm.perplexity == pytest.approx(float(nll.exp()), rel=1e-6)
        assert lm.original_perplexity == pytest.approx(float(reference_nll.exp()), rel=1e-6)
        assert lm.kl_divergence == pytest.approx(float(kl), rel=1e-6)
        assert lm.next_token_agreement == pytest.approx(float(agreement))
        assert lm.top1_agreement is not None  # per position, as for any logits
        assert (embedding.perplexity, embedding.next_tokens) == (None, None)
    (whole, _), (chunked, _) = results
    assert (whole.perplexity, whole.kl_divergence) == pytest.approx(
        (chunked.perplexity, chunked.kl_divergence), rel=1e-12)


def test_next_token_logits_need_the_batch_they_came_from():
    logits = torch.zeros(1, 3, 4)
    with pytest.raises(ValueError, match="input_ids and attention_mask"):
        FidelityMeter(["logits"], [True]).add([logits], [logits])


def test_a_loss_map_may_name_outputs_by_their_onnx_names():
    module, batch = _program_module(_Named())
    kinds = detect_output_kinds(module, call(module, batch), run_outputs(module, batch),
                                {"logits": "regression"}, ["sentence_embedding", "logits"])
    assert kinds == ["embedding", "regression"]


@pytest.mark.parametrize("chunk_values", [7, 40, 1 << 22])
def test_backward_in_chunks_gives_the_loss_and_gradient_of_one_backward_pass(chunk_values):
    """The loss is computed in float32 either way: the two differ by summation order only."""
    from compressor.runtime.objectives import distillation_backward

    generator = torch.Generator().manual_seed(3)
    source = torch.randn(3, 5, 4, generator=generator)
    mixing = [torch.randn(4, d, generator=generator) for d in (11, 6, 1, 2)]
    targets = [torch.randn(3, 5, 11, generator=generator),  # logits
               torch.randn(3, 5, 6, generator=generator),  # embeddings
               torch.randn(3, 5, 1, generator=generator),  # regression
               torch.randn(30, generator=generator)]  # 1-D: not chunked
    kinds = ["logits", "embedding", "regression", "regression"]

    def gradient(run):
        weights = [m.clone().requires_grad_() for m in mixing]
        outputs = [source @ w for w in weights]
        outputs[3] = outputs[3].reshape(-1)
        loss = run(outputs)
        return loss.detach(), [w.grad for w in weights]

    def once(outputs):
        loss = distillation_loss(outputs, targets, kinds)
        loss.backward()
        return loss

    want_loss, want = gradient(once)
    loss, got = gradient(lambda outputs: distillation_backward(outputs, targets, kinds,
                                                               chunk_values))
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-6)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_score_without_gradients_is_summed_in_chunks_to_the_same_value(monkeypatch):
    from compressor.runtime import objectives

    generator = torch.Generator().manual_seed(5)
    outputs = [torch.randn(4, 6, 9, generator=generator), torch.randn(4, 6, 5, generator=generator)]
    targets = [torch.randn(4, 6, 9, generator=generator), torch.randn(4, 6, 5, generator=generator)]
    kinds = ["logits", "embedding"]
    with torch.enable_grad():
        whole = distillation_loss([o.requires_grad_() for o in outputs], targets, kinds).item()
    monkeypatch.setattr(objectives, "_CHUNK_VALUES", 20)  # a few rows per chunk
    with torch.no_grad():
        assert distillation_loss(outputs, targets, kinds).item() == pytest.approx(whole, rel=1e-6)
