"""What each model output is, and the distillation loss that fits it.

An output is one of
- `logits`: (batch, classes) scores read through a softmax (or batch × positions × classes: one
  softmax per position); matched by a tempered KL divergence plus a normalized MSE, scored by
  top-1 agreement (a language model's next-token logits may be matched on the original's top k
  tokens instead: `compressor.runtime.top_logits`);
- `embedding`: a feature vector per sample (a sentence embedding, hidden states); matched by
  cosine distance plus a normalized MSE, scored by cosine;
- `regression`: anything else that is a float (a scalar per sample, a loss); normalized MSE;
- `ignored`: integer and boolean outputs, which carry no gradient.

`finetune.loss: "auto"` detects the kind from the output's name where the program gives one
(`logits`, `sentence_embedding`, `last_hidden_state`, ...) and otherwise from the graph: a 2-D
output computed by a Linear layer is logits; a pooled, normalized or otherwise post-processed
vector is an embedding. A single kind, or a map from ONNX output name (`output_0`, ...) to kind,
overrides the detection.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Literal

import torch
from torch import fx, nn
from torch.nn import functional as F
from torch.utils._pytree import keystr, tree_flatten_with_path

from compressor.errors import ConfigError
from compressor.runtime.top_logits import TopLogits, top_logits_kl

OutputKind = Literal["logits", "embedding", "regression"]
OUTPUT_KINDS: tuple[str, ...] = ("logits", "embedding", "regression")
IGNORED = "ignored"
KL_TEMPERATURE = 2.0
# What an output is matched against: the original's output, or its top k (a language model's
# next-token logits, `compressor.runtime.top_logits`).
Target = torch.Tensor | TopLogits
# Losses are computed on about this many output values at a time where they can be.
_CHUNK_VALUES = 1 << 22
_LOGIT_NAMES = ("logit", "scores", "prediction")
_EMBEDDING_NAMES = ("embed", "hidden", "pool", "feature", "state", "vector")
# Ops that only rearrange a tensor: an output behind them was still computed by what fed them.
_VIEW_OPS = {"view", "reshape", "squeeze", "unsqueeze", "flatten", "clone", "contiguous",
             "_to_copy", "to", "alias", "detach", "permute", "transpose", "select", "slice"}
_LINEAR_OPS = {"linear", "addmm", "mm", "matmul", "conv2d", "convolution"}


def _op_name(node: fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", str(target))  # e.g. "linear.default"
    return name.split(".")[0]


def _computed_by_linear(node: object) -> bool:
    while isinstance(node, fx.Node) and node.op == "call_function":
        op = _op_name(node)
        if op in _LINEAR_OPS:
            return True
        if op not in _VIEW_OPS or not node.args:
            return False
        node = node.args[0]
    return False


def _output_nodes(module: nn.Module) -> list[object] | None:
    graph = getattr(module, "graph", None)
    if not isinstance(graph, fx.Graph):
        return None
    output = next((n for n in graph.nodes if n.op == "output"), None)
    if output is None:
        return None
    leaves, _ = tree_flatten_with_path(output.args[0])
    return [leaf for _, leaf in leaves]


def output_paths(outputs: object) -> list[str]:
    """Return the pytree path of each tensor leaf of a model's raw outputs ("" for a bare one)."""
    leaves, _ = tree_flatten_with_path(outputs)
    return [keystr(path) for path, leaf in leaves if isinstance(leaf, torch.Tensor)]


def _by_name(name: str) -> str | None:
    lowered = name.lower()
    if any(word in lowered for word in _LOGIT_NAMES):
        return "logits"
    if any(word in lowered for word in _EMBEDDING_NAMES):
        return "embedding"
    return None


def _by_shape(output: torch.Tensor, from_linear: bool) -> str:
    if not output.is_floating_point():
        return IGNORED
    if output.dim() == 2 and output.shape[1] >= 2:
        return "logits" if from_linear else "embedding"
    if output.dim() >= 3:
        return "embedding"
    return "regression"


def detect_output_kinds(module: nn.Module, raw_outputs: object, outputs: list[torch.Tensor],
                        setting: str | dict[str, str] = "auto",
                        onnx_names: list[str] | None = None) -> list[str]:
    """Return the kind of each flattened output (see the module docstring).

    `raw_outputs` is what the module returned (for the names in a dict or dataclass output),
    `outputs` its flattened tensors, `setting` the job's `finetune.loss`, whose map may name an
    output `output_<i>` or by its ONNX name (`onnx_names`, e.g. `sentence_embedding`).
    """
    if isinstance(setting, dict):
        aliases = {f"output_{i}": i for i in range(len(outputs))}
        aliases.update({name: i for i, name in enumerate(onnx_names or [])})
        unknown = sorted(set(setting) - set(aliases))
        if unknown:
            raise ConfigError(f"finetune.loss names outputs {unknown} that the model does not "
                              f"have; its outputs are {sorted(set(onnx_names or aliases))}")
        setting = {f"output_{aliases[name]}": kind for name, kind in setting.items()}
    paths = output_paths(raw_outputs)
    nodes = _output_nodes(module)
    kinds = []
    for i, output in enumerate(outputs):
        if not output.is_floating_point():
            kinds.append(IGNORED)
            continue
        chosen = setting.get(f"output_{i}", "auto") if isinstance(setting, dict) else setting
        if chosen != "auto":
            kinds.append(chosen)
            continue
        path = paths[i] if i < len(paths) else ""
        node = nodes[i] if nodes is not None and i < len(nodes) else None
        kinds.append(_by_name(path) or _by_shape(output, _computed_by_linear(node)))
    return kinds


def normalized_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, target) / (target.var(unbiased=False) + 1e-8)


def output_loss(out: torch.Tensor, target: Target, kind: str) -> torch.Tensor:
    """Return the distillation loss of one output against the original's, for its kind (for
    targets kept as their top k, `top_logits_kl` averaged over the positions)."""
    if isinstance(target, TopLogits):
        rows = out.reshape(-1, out.shape[-1])
        return _top_logits_rows_loss(rows, target.rows(), rows.shape[0])
    out, target = out.float(), target.float()
    loss = normalized_mse(out, target)
    if kind == "logits":  # a softmax over the last axis, averaged over every position
        classes = out.shape[-1] if out.dim() >= 2 else 1
        loss = loss + F.kl_div(
            F.log_softmax(out.reshape(-1, classes) / KL_TEMPERATURE, dim=-1),
            F.log_softmax(target.reshape(-1, classes) / KL_TEMPERATURE, dim=-1),
            log_target=True, reduction="batchmean") * KL_TEMPERATURE**2
    elif kind == "embedding":
        flat_out, flat_target = out.reshape(-1, out.shape[-1]), target.reshape(-1, target.shape[-1])
        loss = loss + (1 - F.cosine_similarity(flat_out, flat_target, dim=1, eps=1e-8)).mean()
    return loss


def distillation_loss(outputs: list[torch.Tensor], targets: list[Target],
                      kinds: list[str]) -> torch.Tensor:
    """Return the sum over outputs of the loss that fits each one's kind (ignored ones skipped).

    Without a gradient to compute (scoring) it is summed a chunk of rows at a time, so the
    softmaxes over a large vocabulary are never all held at once; the value is the same up to
    the order of summation."""
    if not (torch.is_grad_enabled() and any(out.requires_grad for out in outputs)):
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for loss in _chunk_losses(outputs, targets, kinds, _CHUNK_VALUES):
            total += loss
        return total
    total = outputs[0].new_zeros((), dtype=torch.float32)
    for out, target, kind in zip(outputs, targets, kinds, strict=True):
        if kind != IGNORED:
            total = total + output_loss(out, target, kind)
    return total


def larger_than_a_chunk(outputs: list[torch.Tensor]) -> bool:
    """Whether any of `outputs` holds more values than the loss takes at a time: its loss is
    then cheaper in memory through `distillation_backward` (a language model's logits, whose
    softmaxes and their gradients would otherwise be held over the whole batch at once)."""
    return any(out.numel() > _CHUNK_VALUES for out in outputs)


def distillation_backward(outputs: list[torch.Tensor], targets: list[Target],
                          kinds: list[str], chunk_values: int = _CHUNK_VALUES) -> torch.Tensor:
    """Backpropagate `distillation_loss(outputs, targets, kinds)` through the graph that
    computed `outputs`, a chunk of rows at a time, and return the loss (detached).

    Computing it a chunk of rows at a time on a detached copy of the outputs frees each chunk's
    intermediates (softmaxes over a 32,000-token vocabulary) before the next; the outputs'
    gradient then goes back through the model once. Same loss and gradient as one backward pass
    through `distillation_loss`, up to the order of summation.
    """
    leaves = [out.detach().requires_grad_() for out in outputs]
    total = leaves[0].new_zeros((), dtype=torch.float32)
    for loss in _chunk_losses(leaves, targets, kinds, chunk_values):
        loss.backward()
        total += loss.detach()
    pairs = [(out, leaf.grad) for out, leaf in zip(outputs, leaves, strict=True)
             if leaf.grad is not None and out.requires_grad]
    if pairs:
        torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])
    return total


def _chunk_losses(outputs: list[torch.Tensor], targets: list[Target], kinds: list[str],
                  chunk_values: int) -> Iterator[torch.Tensor]:
    """Yield `distillation_loss` in parts that sum to it: for an output of 2 or more
    dimensions, a chunk of rows (positions) at a time, about `chunk_values` values each.

    Such an output's loss is a sum over its rows of per-row terms, given two constants of the
    whole output: the target's variance and the row count.
    """
    for out, target, kind in zip(outputs, targets, kinds, strict=True):
        if kind == IGNORED:
            continue
        if out.dim() < 2:
            yield output_loss(out, target, kind)
            continue
        out_rows = out.reshape(-1, out.shape[-1])
        rows = out_rows.shape[0]
        if isinstance(target, TopLogits):
            target_rows, rows_loss = target.rows(), partial(_top_logits_rows_loss, rows=rows)
        else:
            target_rows = target.reshape(-1, target.shape[-1])
            rows_loss = partial(_rows_loss, kind=kind, values=out.numel(), rows=rows,
                                variance=target.float().var(unbiased=False))
        step = max(1, chunk_values // out.shape[-1])
        for start in range(0, rows, step):
            yield rows_loss(out_rows[start:start + step], target_rows[start:start + step])


def _top_logits_rows_loss(out: torch.Tensor, target: TopLogits, rows: int) -> torch.Tensor:
    """Return these rows' share of `output_loss` over an output of `rows` rows whose targets
    are the original's top k."""
    return top_logits_kl(out, target) / rows


def _rows_loss(out: torch.Tensor, target: torch.Tensor, kind: str, values: int, rows: int,
               variance: torch.Tensor) -> torch.Tensor:
    """Return these rows' share of `output_loss` over an output of `values` values in `rows`
    rows whose target has variance `variance`."""
    out, target = out.float(), target.float()
    loss = (out - target).pow(2).sum() / values / (variance + 1e-8)
    if kind == "logits":
        loss = loss + F.kl_div(F.log_softmax(out / KL_TEMPERATURE, dim=-1),
                               F.log_softmax(target / KL_TEMPERATURE, dim=-1),
                               log_target=True, reduction="sum") * KL_TEMPERATURE**2 / rows
    elif kind == "embedding":
        loss = loss + (1 - F.cosine_similarity(out, target, dim=1, eps=1e-8)).sum() / rows
    return loss
