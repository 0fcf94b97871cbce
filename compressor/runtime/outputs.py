"""Run a program on a batch of named inputs and compare its outputs with a reference's."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram
from torch.utils._pytree import MappingKey, tree_flatten, tree_flatten_with_path


def call_arguments(callee: ExportedProgram | nn.Module, batch: dict[str, torch.Tensor],
                   ) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """Split named inputs into the (args, kwargs) a program (or its module) was exported to take.

    A program names its user inputs in its graph signature; the inputs of
    `ExportedProgram.module()` are its placeholders. Either way they come in the flattened order
    of the (args, kwargs) it was exported with, which its input spec records.
    """
    if isinstance(callee, ExportedProgram):
        names = list(callee.graph_signature.user_inputs)
        spec = callee.call_spec.in_spec
    else:
        names = [n.target for n in callee.graph.nodes if n.op == "placeholder"]
        spec = getattr(callee, "_in_spec", None)
    if spec is None:
        return (), dict(batch)
    positional = spec.child(0).num_children
    keys = spec.child(1).context
    args = tuple(batch[name] for name in names[:positional])
    return args, {key: batch[name] for key, name in zip(keys, names[positional:], strict=True)}


def call(module: nn.Module, batch: dict[str, torch.Tensor]):
    """Run `module` on a batch of named inputs, whichever way it takes them."""
    args, kwargs = call_arguments(module, batch)
    return module(*args, **kwargs)


def run_outputs(module: nn.Module, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Return the module's outputs on `batch`, flattened to a list of tensors."""
    leaves, _ = tree_flatten(call(module, batch))
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def output_names(count: int) -> list[str]:
    """Return the ONNX names of a model's outputs: output_0, output_1, ..."""
    return [f"output_{i}" for i in range(count)]


def onnx_output_names(raw_outputs: object) -> list[str]:
    """Return the ONNX names of a module's raw outputs: a dict's keys, else `output_names`."""
    leaves, _ = tree_flatten_with_path(raw_outputs)
    paths = [path for path, leaf in leaves if isinstance(leaf, torch.Tensor)]
    keys = [path[0].key if len(path) == 1 and isinstance(path[0], MappingKey) else None
            for path in paths]
    if all(isinstance(k, str) and k for k in keys) and len(set(keys)) == len(keys):
        return keys
    return output_names(len(paths))


# Output values scored at a time: a decoder's logits (262,144 a position) are never copied
# whole, nor is a batch of them.
_VALUES_PER_CHUNK = 1 << 21


@dataclass
class OutputFidelity:
    """How close one output of a model is to the reference model's, over a data set.

    `cosine` is per sample (per position for outputs of 3+ dimensions), averaged; top-1
    agreement, likewise per sample or position, is given for logits only, where it means
    something. A causal language model's next-token logits also get the language-model figures
    (None for any other output), over the held-out positions whose next token is text, not
    padding (`attention_mask` 1 at both): the perplexity of the model and of the reference
    (exp of the mean negative log-likelihood of the real next token), how often both predict
    the same next token, and the mean per-token KL(reference || model) in nats.
    """

    kind: str
    cosine: float
    relative_l2: float
    top1_agreement: float | None
    perplexity: float | None = None
    original_perplexity: float | None = None
    next_token_agreement: float | None = None
    kl_divergence: float | None = None
    next_tokens: int | None = None  # how many next tokens the figures above are over


class FidelityMeter:
    """Accumulate, batch by batch, how close outputs are to the reference outputs.

    `kinds` holds each output's kind (see `compressor.runtime.objectives`); `next_token` says
    which outputs are a causal language model's next-token logits, (batch, sequence, vocabulary)
    over the batch's `input_ids`: those are also scored against the text itself, so `add` needs
    the batch. An output is seen as vectors along its last dimension (a sequence of logits: one
    vector per position); cosine and top-1 agreement are averaged over those vectors.

    Each vector's figures are computed in its own dtype (float32: sums over one vector are
    accurate to about 1e-7 of their value) and summed over vectors in float64, `_VALUES_PER_CHUNK`
    values at a time. Taking each chunk to float64 first made scoring Gemma-3's logits (262,144 a
    position) 3× slower, most of a held-out evaluation's time, for figures reported to 4 digits.
    """

    def __init__(self, kinds: list[str], next_token: list[bool] | None = None) -> None:
        self._kinds = list(kinds)
        n = len(kinds)
        self._err, self._ref, self._cos, self._agree = [0.0] * n, [0.0] * n, [0.0] * n, [0] * n
        self._vectors = [0] * n
        self._logits = [kind == "logits" for kind in kinds]
        self._next_token = list(next_token) if next_token else [False] * n
        if len(self._next_token) != n:
            raise ValueError(f"next_token has {len(self._next_token)} entries for {n} outputs")
        self._text = [_NextTokenSums() for _ in range(n)]

    def add(self, outputs: list[torch.Tensor], reference: list[torch.Tensor],
            batch: dict[str, torch.Tensor] | None = None) -> None:
        """Add one batch of outputs, their reference outputs and (for next-token logits) the
        inputs they were computed from."""
        for i, (out, ref) in enumerate(zip(outputs, reference, strict=True)):
            width = out.shape[-1] if out.dim() >= 2 else 1
            flat_out = out.detach().reshape(-1, width)
            flat_ref = ref.detach().reshape(-1, width)
            step = max(1, _VALUES_PER_CHUNK // width)
            for start in range(0, flat_ref.shape[0], step):
                self._add_vectors(i, flat_out[start:start + step], flat_ref[start:start + step])
            if self._next_token[i]:
                if batch is None:
                    raise ValueError(f"output {i} is a language model's next-token logits: "
                                     "pass the batch its input_ids and attention_mask came in")
                self._text[i].add(out.detach(), ref.detach(), batch["input_ids"],
                                  batch["attention_mask"])

    def _add_vectors(self, i: int, out: torch.Tensor, ref: torch.Tensor) -> None:
        out, ref = _computable(out), _computable(ref)
        self._err[i] += _sum_of_rows(torch.linalg.vector_norm(out - ref, dim=1).pow(2))
        self._ref[i] += _sum_of_rows(torch.linalg.vector_norm(ref, dim=1).pow(2))
        self._cos[i] += _sum_of_rows(torch.nn.functional.cosine_similarity(
            out, ref, dim=1, eps=1e-12))
        self._vectors[i] += ref.shape[0]
        if self._logits[i]:
            self._agree[i] += int((out.argmax(-1) == ref.argmax(-1)).sum())

    def result(self) -> list[OutputFidelity]:
        """Return the fidelity of every output."""
        return [
            OutputFidelity(
                kind=self._kinds[i],
                cosine=self._cos[i] / max(1, self._vectors[i]),
                relative_l2=(self._err[i] / max(self._ref[i], 1e-30)) ** 0.5,
                top1_agreement=(self._agree[i] / max(1, self._vectors[i])
                                if self._logits[i] else None),
                **(self._text[i].figures() if self._next_token[i] else {}),
            )
            for i in range(len(self._err))
        ]


class _NextTokenSums:
    """Sums over the positions of a language model's logits whose next token is text: the
    model's and the reference's negative log-likelihood of that token, KL(reference || model),
    and top-1 agreement."""

    def __init__(self) -> None:
        self.nll = self.reference_nll = self.kl = 0.0
        self.agree = self.tokens = 0

    def add(self, out: torch.Tensor, ref: torch.Tensor, ids: torch.Tensor,
            mask: torch.Tensor) -> None:
        # Position t predicts token t + 1; both must be text for it to count.
        if out.dim() != 3 or out.shape[:2] != ids.shape:
            raise ValueError(f"next-token logits must be (batch, sequence, vocabulary) over "
                             f"input_ids {tuple(ids.shape)}; got {tuple(out.shape)}")
        kept = (mask[:, :-1] != 0) & (mask[:, 1:] != 0)
        batch, position = kept.nonzero(as_tuple=True)
        rows = (batch * ids.shape[1] + position).to(out.device)
        targets = ids[batch, position + 1].to(out.device)
        width = out.shape[-1]
        flat_out, flat_ref = out.reshape(-1, width), ref.reshape(-1, width)
        step = max(1, _VALUES_PER_CHUNK // width)
        for start in range(0, rows.shape[0], step):
            chunk, target = rows[start:start + step], targets[start:start + step, None]
            log_p = _computable(flat_out[chunk]).log_softmax(-1)
            log_q = _computable(flat_ref[chunk]).log_softmax(-1)
            self.nll -= _sum_of_rows(log_p.gather(1, target))
            self.reference_nll -= _sum_of_rows(log_q.gather(1, target))
            self.kl += _sum_of_rows((log_q.exp() * (log_q - log_p)).sum(1))
            self.agree += int((log_p.argmax(-1) == log_q.argmax(-1)).sum())
        self.tokens += int(rows.shape[0])

    def figures(self) -> dict[str, float | int | None]:
        if not self.tokens:  # no text followed by text: nothing to score
            return {"next_tokens": 0}
        return {"perplexity": math.exp(self.nll / self.tokens),
                "original_perplexity": math.exp(self.reference_nll / self.tokens),
                "next_token_agreement": self.agree / self.tokens,
                "kl_divergence": self.kl / self.tokens,
                "next_tokens": self.tokens}


def _computable(values: torch.Tensor) -> torch.Tensor:
    """`values` in a dtype fidelity is computed in: float32 or float64 as they are, half
    precision widened to float32, integers (an output of ids, a count) to float64."""
    if values.dtype in (torch.float32, torch.float64):
        return values
    return values.float() if values.is_floating_point() else values.double()


def _sum_of_rows(per_row: torch.Tensor) -> float:
    """Sum per-vector figures in float64."""
    return float(per_row.double().sum())


def fidelity_by_output(fidelity: list[OutputFidelity], names: list[str]) -> dict[str, dict]:
    """Return per-output fidelity as plain data (every figure), keyed by output name."""
    return {name: asdict(f) for name, f in zip(names, fidelity, strict=True)}


# The figure each output kind is judged by in target mode, and whether lower is better.
JUDGED_FIGURES = {"logits": ("top1_agreement", False), "embedding": ("cosine", False),
                  "regression": ("relative_l2", True)}
# A causal language model's next-token logits are judged by this instead: held-out perplexity
# over the original's (people judge a language model by its perplexity, and its per-position
# top-1 agreement is far below any classifier's even for onnxruntime's int8 of the original).
PERPLEXITY_RATIO = "perplexity_ratio"
# How each judged figure is named in messages.
FIGURE_LABELS = {"top1_agreement": "top-1 agreement", "cosine": "cosine",
                 "relative_l2": "relative L2", PERPLEXITY_RATIO: "perplexity × the original's"}


def judged_figure(figures: dict[str, Any]) -> tuple[str, float, bool] | None:
    """Return the figure one output's fidelity `figures` is judged by in target mode: its name,
    its value, and whether lower is better. None: an output of a kind judged by nothing (an
    integer output), or a language model's with no next token scored."""
    if figures.get("perplexity") is not None and figures.get("original_perplexity"):
        return PERPLEXITY_RATIO, figures["perplexity"] / figures["original_perplexity"], True
    judged = JUDGED_FIGURES.get(figures["kind"])
    if judged is None or figures.get(judged[0]) is None:
        return None
    return judged[0], figures[judged[0]], judged[1]


def describe_fidelity(fidelity: dict[str, dict[str, Any]]) -> str:
    """Return each output's judged figure (by output name) as one line of text."""
    parts = []
    for name, figures in fidelity.items():
        judged = judged_figure(figures)
        if judged is not None:
            figure, value, _ = judged
            parts.append(f"{name} {FIGURE_LABELS[figure]} {value:.4f}")
    return ", ".join(parts) or "no scored output"
