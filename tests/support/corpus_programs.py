"""A corpus of programs exported the many ways users export them, built from tiny models.

Each `Case` builds a model and its example inputs, exports it the way its name says, and states
the outcome `compressor.compress` must reach: a verified ONNX (`COMPRESSES`), or a refusal with a
`CompressorError` whose code is `refuses` and whose message contains each of `says` (what is
unsupported and what to do). Nothing is downloaded; every model is a few thousand weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import Dim
from torch.nn import functional as F

COMPRESSES = "compresses"


@dataclass(frozen=True)
class Export:
    """What `torch.export.export` is called with."""

    model: nn.Module
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    dynamic_shapes: Any = None


@dataclass(frozen=True)
class Case:
    """One way to export one model, and the outcome compressing it must have."""

    name: str
    build: Callable[[], Export]
    refuses: str | None = None  # the CompressorError code; None: it compresses
    says: tuple[str, ...] = ()  # fragments the refusal's message contains
    skipped: tuple[str, ...] = ()  # layers the report must list as skipped (name prefix)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def outcome(self) -> str:
        """`compresses`, or `refuses (<code>)`."""
        return COMPRESSES if self.refuses is None else f"refuses ({self.refuses})"


def export(case: Case) -> torch.export.ExportedProgram:
    """Export the case's model as its example says."""
    torch.manual_seed(0)
    spec = case.build()
    if spec.args and isinstance(spec.args[0], torch.export.ExportedProgram):
        return spec.args[0]  # exported by the library's own recipe
    return torch.export.export(spec.model.eval(), spec.args, kwargs=spec.kwargs,
                               dynamic_shapes=spec.dynamic_shapes)


def save(case: Case, path: Path) -> Path:
    """Export the case's model as its example says and save the program at `path`."""
    torch.export.save(export(case), str(path))
    return path


def _batch() -> Dim:
    return Dim("batch", min=1, max=4096)


# -- models ---------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, features: int = 32, hidden: int = 64, out: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class MixedInputs(nn.Module):
    """Float features, int64 ids and a bool mask in; logits out."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.features = nn.Linear(16, 32)
        self.mix = nn.Linear(32, 64)
        self.head = nn.Linear(64, 5)

    def forward(self, features: torch.Tensor, ids: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(ids) * mask.unsqueeze(-1)
        h = tokens.sum(1) / mask.sum(1, keepdim=True).clamp(min=1) + self.features(features)
        return self.head(torch.relu(self.mix(h)))


class ManyOutputs(nn.Module):
    """One body, outputs packed as `kind`: tuple, list, dict or nested."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.body = nn.Linear(32, 64)
        self.logits = nn.Linear(64, 10)
        self.embedding = nn.Linear(64, 32)

    def forward(self, x: torch.Tensor):
        h = torch.relu(self.body(x))
        logits, embedding = self.logits(h), self.embedding(h)
        if self.kind == "tuple":
            return logits, embedding
        if self.kind == "list":
            return [logits, embedding]
        if self.kind == "dict":
            return {"logits": logits, "embedding": embedding}
        return {"heads": (logits, embedding), "pooled": [h.mean(-1)]}


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaBlock(nn.Module):
    """Pre-norm decoder block: GQA attention with rotary positions, SwiGLU MLP."""

    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.attn_norm = RMSNorm(dim)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.mlp_norm = RMSNorm(dim)
        self.gate_proj = nn.Linear(dim, 2 * dim, bias=False)
        self.up_proj = nn.Linear(dim, 2 * dim, bias=False)
        self.down_proj = nn.Linear(2 * dim, dim, bias=False)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = h.shape
        x = self.attn_norm(h)
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.o_proj(a.transpose(1, 2).reshape(b, t, -1))
        x = self.mlp_norm(h)
        return h + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TinyLlama(nn.Module):
    """A Llama-style decoder: rotary tables as buffers, GQA, optionally a tied LM head."""

    def __init__(self, vocab: int = 96, dim: int = 32, layers: int = 1, tied: bool = False,
                 max_positions: int = 128) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(LlamaBlock(dim, heads=4, kv_heads=2) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed_tokens.weight
        head_dim = dim // 4
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.outer(torch.arange(max_positions).float(), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("cos_cached", angles.cos(), persistent=False)
        self.register_buffer("sin_cached", angles.sin(), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        cos, sin = self.cos_cached[:t], self.sin_cached[:t]
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, cos, sin)
        return self.lm_head(self.norm(h))


def exported_decoder(model: TinyLlama, ids: torch.Tensor) -> torch.export.ExportedProgram:
    """Export a `TinyLlama` from two rows of `ids`, at a dynamic batch and sequence length."""
    return torch.export.export(model.eval(), (ids[:2],), dynamic_shapes=(
        {0: Dim("batch"), 1: Dim("tokens", max=128)},))


class SharedLayer(nn.Module):
    """One Linear called twice (a shared module), between two plain layers."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(32, 64)
        self.shared = nn.Linear(64, 64)
        self.out = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        h = torch.relu(self.shared(h))
        h = torch.relu(self.shared(h))
        return self.out(h)


class ConvZoo(nn.Module):
    """Conv2d with stride, dilation, a reflect / circular padding mode and a grouped conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.dilated = nn.Conv2d(16, 32, 3, dilation=2, padding=2)
        self.reflect = nn.Conv2d(32, 32, 3, padding=1, padding_mode="reflect")
        self.circular = nn.Conv2d(32, 32, 3, padding=1, padding_mode="circular")
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.grouped = nn.Conv2d(32, 32, 1, groups=4)
        self.head = nn.Linear(32, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(image))
        h = torch.relu(self.dilated(h))
        h = torch.relu(self.reflect(h))
        h = torch.relu(self.circular(h))
        h = torch.relu(self.grouped(self.depthwise(h)))
        return self.head(h.mean((2, 3)))


class ConvBN(nn.Module):
    """Conv2d + BatchNorm2d (running statistics as buffers) + Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(image)))
        return self.head(torch.relu(self.conv2(h)).mean((2, 3)))


class Conv1dNet(nn.Module):
    """1-D convolutions over (batch, channels, time), then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(8, 32, 5, padding=2)
        self.conv2 = nn.Conv1d(32, 32, 3, stride=2)
        self.head = nn.Linear(32, 16)

    def forward(self, signal: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(signal))))
        return self.head(h.mean(-1))


class SamePadding(nn.Module):
    """Conv2d with padding='same' (a string), then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.same = nn.Conv2d(3, 32, 3, padding="same")
        self.conv = nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(torch.relu(self.same(image))))
        return self.head(h.mean((2, 3)))


class OnlyConv1d(nn.Module):
    """Nothing but 1-D convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(8, 32, 5, padding=2)
        self.conv2 = nn.Conv1d(32, 32, 3)

    def forward(self, signal: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(signal)))


class OnlyConv3d(nn.Module):
    """Nothing but 3-D convolutions (no layer kind)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(4, 16, 3, padding=1)
        self.conv2 = nn.Conv3d(16, 16, 3)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(volume)))


class PredictsClasses(nn.Module):
    """Logits and the int64 predicted class."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = MLP()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.mlp(x)
        return logits, logits.argmax(-1)


class CountsCalls(nn.Module):
    """Updates a buffer in forward (a call counter), as some models keep statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = MLP()
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return self.mlp(x)


@torch.library.custom_op("corpus::clipped_gelu", mutates_args=())
def clipped_gelu(x: torch.Tensor) -> torch.Tensor:
    """A custom operator with no autograd formula and no ONNX translation."""
    return F.gelu(x).clamp(-3, 3)


@clipped_gelu.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class CustomOperator(nn.Module):
    """Calls `op` between two Linear layers."""

    def __init__(self, op: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.op = op
        self.mlp = MLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.fc2(self.op(self.mlp.fc1(x)))


class WithLoss(nn.Module):
    """Returns only the scalar loss of its logits against targets."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = MLP()

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.mlp(x), target)


class ComputedWeight(nn.Module):
    """A Linear whose weight is computed in forward (weight normalization by hand)."""

    def __init__(self) -> None:
        super().__init__()
        self.direction = nn.Parameter(torch.randn(64, 32))
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.direction / self.direction.norm(dim=1, keepdim=True)
        return self.fc(torch.relu(F.linear(x, weight)))


class CastsInput(nn.Module):
    """Takes half-precision features and computes in float32."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = MLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x.float())


class NestedInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = MLP()

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.mlp(inputs["x"])


# -- cases ----------------------------------------------------------------------------------


def _ids(batch: int = 4, length: int = 16, vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


def _positional() -> Export:
    return Export(MLP(), (torch.randn(4, 32),), dynamic_shapes=({0: _batch()},))


def _keyword() -> Export:
    return Export(MLP(), kwargs={"x": torch.randn(4, 32)},
                  dynamic_shapes={"x": {0: _batch()}})


def _mixed_dtypes() -> Export:
    batch = _batch()
    mask = torch.ones(4, 12, dtype=torch.bool)
    mask[:, 9:] = False
    return Export(MixedInputs(), (torch.randn(4, 16),),
                  {"ids": torch.randint(0, 50, (4, 12)), "mask": mask},
                  {"features": {0: batch}, "ids": {0: batch}, "mask": {0: batch}})


def _outputs(kind: str) -> Callable[[], Export]:
    return lambda: Export(ManyOutputs(kind), (torch.randn(4, 32),),
                          dynamic_shapes=({0: _batch()},))


def _llama(seq: Any, ids: torch.Tensor | None = None, **model: Any) -> Callable[[], Export]:
    def build() -> Export:
        example = _ids() if ids is None else ids
        shapes = {0: _batch()} if seq is None else {0: _batch(), 1: seq}
        return Export(TinyLlama(**model), (example,), dynamic_shapes=(shapes,))
    return build


def _llama_sliced() -> Export:
    # The program: exported from a slice of a token batch, sequence left to Dim.AUTO.
    ids = torch.randint(0, 96, (8, 128), generator=torch.Generator().manual_seed(1))
    return Export(TinyLlama(), (ids[:2, :64],),
                  dynamic_shapes=({0: Dim("batch"), 1: Dim.AUTO},))


def _non_contiguous() -> Export:
    features = torch.randn(32, 6).t()  # (6, 32), strides (1, 6)
    return Export(MLP(), (features,), dynamic_shapes=({0: _batch()},))


def _strided_view() -> Export:
    features = torch.randn(8, 64)[::2, ::2]  # every other row and column of a larger tensor
    return Export(MLP(), (features,), dynamic_shapes=({0: Dim.AUTO},))


def _half_input() -> Export:
    return Export(CastsInput(), (torch.randn(4, 32).half(),), dynamic_shapes=({0: _batch()},))


def _dtype_model(dtype: torch.dtype) -> Callable[[], Export]:
    return lambda: Export(MLP().to(dtype), (torch.randn(4, 32, dtype=dtype),),
                          dynamic_shapes=({0: _batch()},))


def _conv_zoo() -> Export:
    return Export(ConvZoo(), (torch.randn(2, 3, 16, 16),), dynamic_shapes=({0: _batch()},))


def _conv_bn() -> Export:
    return Export(ConvBN(), (torch.randn(2, 3, 8, 8),), dynamic_shapes=({0: _batch()},))


def _conv1d() -> Export:
    return Export(Conv1dNet(), (torch.randn(2, 8, 20),), dynamic_shapes=({0: _batch()},))


def _shared_layer() -> Export:
    return Export(SharedLayer(), (torch.randn(4, 32),), dynamic_shapes=({0: _batch()},))


def _computed_weight() -> Export:
    return Export(ComputedWeight(), (torch.randn(4, 32),), dynamic_shapes=({0: _batch()},))


def _same_padding() -> Export:
    return Export(SamePadding(), (torch.randn(2, 3, 8, 8),), dynamic_shapes=({0: _batch()},))


def _only_conv1d() -> Export:
    return Export(OnlyConv1d(), (torch.randn(2, 8, 20),), dynamic_shapes=({0: _batch()},))


def _only_conv3d() -> Export:
    return Export(OnlyConv3d(), (torch.randn(2, 4, 6, 6, 6),), dynamic_shapes=({0: _batch()},))


def _simple(model: Callable[[], nn.Module]) -> Callable[[], Export]:
    return lambda: Export(model(), (torch.randn(4, 32),), dynamic_shapes=({0: _batch()},))


def _custom_operator() -> Export:
    return _simple(lambda: CustomOperator(clipped_gelu))()


def _unregistered_operator() -> Export:
    # Registered while exporting only: where the program is loaded, the operator is unknown (as
    # in the service, which never imports a user's operator code).
    library = torch.library.Library("corpus_gone", "DEF")
    library.define("clipped_gelu(Tensor x) -> Tensor")
    library.impl("clipped_gelu", lambda x: F.gelu(x).clamp(-3, 3), "CompositeExplicitAutograd")
    torch.library.register_fake("corpus_gone::clipped_gelu", torch.empty_like, lib=library)
    try:
        model = CustomOperator(torch.ops.corpus_gone.clipped_gelu).eval()
        program = torch.export.export(model, (torch.randn(4, 32),),
                                      dynamic_shapes=({0: _batch()},))
    finally:
        library._destroy()
    return Export(model, args=(program,))


def _loss_output() -> Export:
    batch = _batch()
    return Export(WithLoss(), (torch.randn(4, 32), torch.randint(0, 10, (4,))),
                  dynamic_shapes=({0: batch}, {0: batch}))


def _static_batch() -> Export:
    return Export(MLP(), (torch.randn(4, 32),))


def _nested_input() -> Export:
    return Export(NestedInput(), ({"x": torch.randn(4, 32)},),
                  dynamic_shapes=({"x": {0: _batch()}},))


def _small_max_batch() -> Export:
    return Export(MLP(), (torch.randn(4, 32),), dynamic_shapes=({0: Dim("batch", max=8)},))


def _batch_min_two() -> Export:
    return Export(MLP(), (torch.randn(4, 32),),
                  dynamic_shapes=({0: Dim("batch", min=2, max=4096)},))


# Hugging Face models, built from tiny configs (nothing downloaded), exported as their users do.


def _hf_llama() -> Export:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, use_cache=False, tie_word_embeddings=True)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    dims = {0: Dim("batch"), 1: Dim.AUTO}
    return Export(LlamaForCausalLM(config), kwargs={"input_ids": ids,
                                                   "attention_mask": torch.ones_like(ids)},
                  dynamic_shapes={"input_ids": dims, "attention_mask": dims})


def _hf_bert_classifier() -> Export:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=64,
                        num_labels=3)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    return Export(BertForSequenceClassification(config), (ids,),
                  dynamic_shapes=({0: Dim("batch"), 1: Dim("seq", max=64)},))


def _hf_gpt2() -> Export:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        use_cache=False)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    dims = {0: Dim("batch"), 1: Dim.AUTO}
    return Export(GPT2LMHeadModel(config), kwargs={"input_ids": ids,
                                                  "attention_mask": torch.ones_like(ids)},
                  dynamic_shapes={"input_ids": dims, "attention_mask": dims})


def _hf_executorch_recipe() -> Export:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, use_cache=True)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        use_cache=True, cache_implementation="static",
        cache_config={"batch_size": 1, "max_cache_len": 32})
    program = TorchExportableModuleForDecoderOnlyLM(model).export(
        input_ids=torch.randint(0, 128, (1, 4)), cache_position=torch.arange(4))
    return Export(model, args=(program,))


CASES: list[Case] = [
    Case("positional input", _positional),
    Case("keyword input", _keyword),
    Case("float, int64 ids and bool mask, positional and keyword", _mixed_dtypes),
    Case("tuple output", _outputs("tuple")),
    Case("list output", _outputs("list")),
    Case("dict output", _outputs("dict")),
    Case("nested output", _outputs("nested")),
    Case("decoder, dynamic batch only", _llama(None)),
    Case("decoder, named batch and sequence dims", _llama(Dim("seq", min=2, max=128))),
    Case("decoder, sequence Dim.AUTO", _llama(Dim.AUTO)),
    Case("decoder, sequence Dim.DYNAMIC", _llama(Dim.DYNAMIC)),
    Case("decoder exported from a slice ids[:2, :64] (issue 13)", _llama_sliced),
    # A tied table is compressed once for both of its uses: on random weights, ratio 0.5 of it
    # leaves the logits about as far from the original's as they are large.
    Case("decoder, tied embedding and LM head", _llama(Dim.AUTO, tied=True),
         config={"ratio": 0.75}),
    Case("non-contiguous example input", _non_contiguous),
    Case("strided view example input, batch Dim.AUTO", _strided_view),
    Case("float16 example input, float32 model", _half_input),
    Case("bfloat16 weights", _dtype_model(torch.bfloat16), refuses="unsupported_model",
         says=("bfloat16", "'fc1.weight'", "model.float()")),
    Case("float16 weights", _dtype_model(torch.float16)),
    Case("Conv2d stride, dilation, padding modes, groups", _conv_zoo,
         skipped=("depthwise", "grouped")),
    Case("Conv2d + BatchNorm running statistics", _conv_bn),
    Case("1-D convolutions", _conv1d),
    Case("Conv2d with padding='same'", _same_padding, skipped=("same",)),
    Case("only 1-D convolutions", _only_conv1d),
    Case("only 3-D convolutions", _only_conv3d, refuses="invalid_config",
         says=("3-D convolution", "conv1", "conv2")),
    Case("logits and an int64 prediction out", _simple(PredictsClasses)),
    Case("a buffer updated in forward", _simple(CountsCalls)),
    Case("a layer called twice (shared module)", _shared_layer, skipped=("shared",)),
    Case("weight computed in forward", _computed_weight, skipped=("linear",)),
    Case("scalar loss output", _loss_output, refuses="unsupported_model",
         says=("output 0 is a scalar", "without the loss")),
    Case("custom operator without autograd or ONNX translation", _custom_operator,
         refuses="unsupported_model",
         says=("custom operator corpus.clipped_gelu", "no autograd formula", "plain torch code")),
    Case("custom operator the loading process does not have", _unregistered_operator,
         refuses="unsupported_model",
         says=("custom operator torch.ops.corpus_gone.clipped_gelu", "plain torch code")),
    Case("static batch dimension", _static_batch, refuses="invalid_model",
         says=("static batch dimension", "Dim(\"batch\")")),
    Case("dict of tensors as input", _nested_input, refuses="invalid_model",
         says=("nested", "one tensor per argument")),
    Case("batch dimension capped at 8", _small_max_batch, refuses="guard_failed",
         says=("input 'x'", "`x.size()[0] <= 8`", "Dim('batch')")),
    Case("batch dimension of at least 2", _batch_min_two),
    Case("Hugging Face Llama causal LM, tied head, keyword inputs", _hf_llama,
         config={"ratio": 0.75}),
    Case("Hugging Face BERT classifier, ModelOutput out", _hf_bert_classifier),
    Case("Hugging Face GPT-2 causal LM: Conv1D projections, tied head", _hf_gpt2,
         config={"ratio": 0.75}),
    Case("Hugging Face Llama through transformers' executorch export recipe",
         _hf_executorch_recipe, refuses="invalid_model",
         says=("input 'input_ids' has a static batch dimension", "Dim(\"batch\")")),
]
