"""Distillation on a language model's top-k next tokens, with one bucket for the rest.

A causal LM's logits are a distribution over its whole vocabulary at every position: 1 MB a
position for Gemma-3's 262,144 tokens. Held whole as fine-tuning's targets they cannot be kept
for the training split, so the original would run again at every step, and the loss would
weigh every one of those logits in its MSE although only the distribution matters for the
text. Almost all of the original's mass sits on a few tokens: `TopLogits` keeps, per position,
the log-probabilities (at the distillation temperature) of its k most likely tokens, their
indices, and the log of the mass of all the others. `top_logits_kl` is the KL divergence of the
student's distribution from it over those k + 1 outcomes (the k tokens, and "any other"). It is
the full KL divergence when the other tokens carry no mass, and never more than it (merging
outcomes can only lower a KL divergence); its gradient still reaches every logit of the
student's, through the softmax's normalization and the bucket.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The smallest log-mass kept for "every other token": below it the bucket's share of the loss
# is nothing a float32 could carry (and an exact 0 would make it 0 × -inf).
_LOG_MASS_FLOOR = -80.0
# Positions whose full distribution is formed at a time when the top k are taken.
_ROWS_PER_CHUNK = 256


@dataclass
class TopLogits:
    """The original's k most likely classes at each position of an output of `classes`
    classes: their log-probabilities at temperature `temperature` and indices (int32: 8 bytes
    a kept class instead of 12), (..., k), and `rest`, (...), the log of the mass of every other
    class."""

    log_probs: torch.Tensor
    indices: torch.Tensor
    rest: torch.Tensor
    classes: int
    temperature: float

    @classmethod
    def of(cls, logits: torch.Tensor, k: int, temperature: float) -> TopLogits:
        """Return the top `k` of `logits` (..., classes) at `temperature`, a chunk of rows at
        a time (a distribution over the vocabulary is formed for those rows only)."""
        classes = logits.shape[-1]
        if not 0 < k < classes:
            raise ValueError(f"top-k distillation needs 0 < k < classes; got k={k} of {classes}")
        rows = logits.detach().reshape(-1, classes)
        parts = [_top_rows(rows[start:start + _ROWS_PER_CHUNK], k, temperature)
                 for start in range(0, rows.shape[0], _ROWS_PER_CHUNK)]
        log_probs, indices, rest = (torch.cat(column) for column in zip(*parts, strict=True))
        lead = logits.shape[:-1]
        return cls(log_probs.reshape(*lead, k), indices.reshape(*lead, k), rest.reshape(lead),
                   classes, temperature)

    @property
    def device(self) -> torch.device:
        return self.log_probs.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.log_probs, self.indices, self.rest))

    def __getitem__(self, index) -> TopLogits:
        """Select along the leading (sample) dimension, as a tensor would."""
        return TopLogits(self.log_probs[index], self.indices[index], self.rest[index],
                         self.classes, self.temperature)

    def to(self, device: torch.device) -> TopLogits:
        return TopLogits(self.log_probs.to(device), self.indices.to(device),
                         self.rest.to(device), self.classes, self.temperature)

    def rows(self) -> TopLogits:
        """Return the same targets with every leading dimension flattened into one."""
        k = self.indices.shape[-1]
        return TopLogits(self.log_probs.reshape(-1, k), self.indices.reshape(-1, k),
                         self.rest.reshape(-1), self.classes, self.temperature)

    @staticmethod
    def cat(parts: list[TopLogits]) -> TopLogits:
        """Concatenate along the leading (sample) dimension."""
        first = parts[0]
        return TopLogits(torch.cat([p.log_probs for p in parts]),
                         torch.cat([p.indices for p in parts]),
                         torch.cat([p.rest for p in parts]), first.classes, first.temperature)


def _top_rows(logits: torch.Tensor, k: int,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    log_p = (logits.float() / temperature).log_softmax(-1)
    top = log_p.topk(k, dim=-1)
    rest = _log_mass_outside(log_p, top.indices).clamp_min(_LOG_MASS_FLOOR)
    return top.values, top.indices.to(torch.int32), rest


def _log_mass_outside(log_p: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Return log Σ exp(log_p) over the classes not in `indices`, row by row."""
    return log_p.scatter(-1, indices.long(), float("-inf")).logsumexp(-1)


def top_logits_kl(logits: torch.Tensor, target: TopLogits) -> torch.Tensor:
    """Return Σ over rows of KL(target ‖ student) over the target's k + 1 outcomes, times the
    temperature² (as the full tempered KL is scaled), for `logits` (rows, classes) and `target`
    over the same rows."""
    if logits.shape[-1] != target.classes:
        raise ValueError(f"logits have {logits.shape[-1]} classes, the targets "
                         f"{target.classes}")
    scaled = logits.float() / target.temperature
    normalizer = scaled.logsumexp(-1, keepdim=True)
    log_q_top = scaled.gather(-1, target.indices.long()) - normalizer
    log_q_rest = _log_mass_outside(scaled, target.indices) - normalizer[..., 0]
    top = (target.log_probs.exp() * (target.log_probs - log_q_top)).sum()
    rest = (target.rest.exp() * (target.rest - log_q_rest)).sum()
    return (top + rest) * target.temperature**2


# `logits_top_k: "auto"`: this many tokens, for a vocabulary of more than `_AUTO_MIN_CLASSES`.
AUTO_TOP_K = 64
_AUTO_MIN_CLASSES = 1024


@dataclass(frozen=True)
class TopKOutputs:
    """Which of a model's outputs are distilled on their top k, from the job's
    `finetune.logits_top_k` (an int, "auto" or None) and which outputs are a language model's
    next-token logits (`next_token`)."""

    setting: int | str | None
    next_token: tuple[bool, ...]
    temperature: float

    def k_for(self, index: int, classes: int) -> int | None:
        """Return the k output `index` (of `classes` classes) keeps, or None: all of it."""
        if self.setting is None or index >= len(self.next_token) or not self.next_token[index]:
            return None
        if self.setting == "auto":
            return AUTO_TOP_K if classes > max(_AUTO_MIN_CLASSES, AUTO_TOP_K) else None
        return int(self.setting) if int(self.setting) < classes else None

    def compact(self, outputs: list[torch.Tensor]) -> list[torch.Tensor | TopLogits]:
        """Return `outputs` with each output this keeps the top k of replaced by them."""
        compacted: list[torch.Tensor | TopLogits] = []
        for index, output in enumerate(outputs):
            k = self.k_for(index, output.shape[-1]) if output.dim() >= 2 else None
            compacted.append(output if k is None else TopLogits.of(output, k, self.temperature))
        return compacted


def kept_k(targets: list[torch.Tensor | TopLogits]) -> int | None:
    """Return the k the first output kept as its top k is kept at (None: all kept whole)."""
    return next((t.indices.shape[-1] for t in targets if isinstance(t, TopLogits)), None)


def target_bytes(targets: list[torch.Tensor | TopLogits]) -> int:
    """Return the bytes `targets` hold."""
    return sum(t.nbytes if isinstance(t, TopLogits) else t.numel() * t.element_size()
               for t in targets)


def concat(parts: list[torch.Tensor | TopLogits]) -> torch.Tensor | TopLogits:
    """Concatenate targets of one output along the sample dimension."""
    return TopLogits.cat(parts) if isinstance(parts[0], TopLogits) else torch.cat(parts)
