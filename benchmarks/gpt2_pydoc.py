"""Train a small GPT-2 here, on text that ships with Python, and save it as a Hugging Face folder.

    python -m benchmarks.gpt2_pydoc     # writes benchmarks/.cache/lm/gpt2-pydoc once

No pretrained GPT-2 ships in a package, so this one is made here to run GPT-2's architecture end to
end: `GPT2LMHeadModel` (Conv1D projections, `wte` tied to `lm_head`), 4 blocks of width 192,
128 positions, a byte-level BPE vocabulary of 8,192 trained with the `tokenizers` library.

The text: the docstrings (`ast.get_docstring`) of the standard library's `.py` files, in sorted
file order, without `site-packages` and `pydoc_data`. bench_lm's job data and held-out text are
the paragraphs of `pydoc_data.topics`: a docstring paragraph that is also one of those is left
out, so the two texts are disjoint. Everything is seeded (one torch thread count aside: the
folder records the threads it was trained with); the folder also holds `training.json` (tokens,
steps, time, final train loss).
"""

from __future__ import annotations

import ast
import json
import random
import re
import sysconfig
import time
import warnings
from pathlib import Path

import torch

NAME = "gpt2-pydoc"
VOCAB = 8192
LENGTH = 128
EOS = "<|endoftext|>"
SHAPE = {"n_layer": 4, "n_embd": 192, "n_head": 4}
STEPS, BATCH, LR, SEED = 400, 8, 2e-3, 0


def docstrings(excluded: set[str]) -> list[str]:
    """Return the standard library's docstrings, less the paragraphs in `excluded`."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for path in sorted(stdlib.rglob("*.py")):
        if {"site-packages", "pydoc_data"} & set(path.relative_to(stdlib).parts):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escapes in old test files
                tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                kept = [block for block in re.split(r"\n\s*\n", ast.get_docstring(node) or "")
                        if block.strip() and " ".join(block.split()) not in excluded]
                if kept:
                    found.append("\n\n".join(kept))
    return found


def topic_paragraphs() -> set[str]:
    """Return every paragraph of `pydoc_data.topics`, whitespace normalized as bench_lm does."""
    from pydoc_data.topics import topics

    return {" ".join(block.split()) for text in topics.values()
            for block in re.split(r"\n\s*\n", text)}


def train_tokenizer(texts: list[str]):
    """Return a byte-level BPE tokenizer of `VOCAB` entries trained on `texts`."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=VOCAB, min_frequency=2, special_tokens=[EOS],
                            show_progress=False)
    return GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS,
                             unk_token=EOS, model_max_length=LENGTH)


def blocks(tokenizer, texts: list[str]) -> torch.Tensor:
    """Return the texts as one stream (an EOS after each), cut into `LENGTH`-token rows."""
    stream = []
    for ids in tokenizer(texts)["input_ids"]:
        stream.extend(ids + [tokenizer.eos_token_id])
    rows = len(stream) // LENGTH
    return torch.tensor(stream[:rows * LENGTH]).view(rows, LENGTH)


def make(folder: Path) -> Path:
    """Train the tokenizer and the model and save both in `folder`; return it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    random.seed(SEED)
    torch.manual_seed(SEED)
    texts = docstrings(topic_paragraphs())
    tokenizer = train_tokenizer(texts)
    data = blocks(tokenizer, texts)
    config = GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, **SHAPE, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    warmup = STEPS // 20
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, 0.5 * (1 + torch.cos(
            torch.tensor(torch.pi * step / STEPS)).item())))
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(SEED))
    losses = []
    start = time.perf_counter()
    model.train()
    for step in range(STEPS):
        rows = order[(step * BATCH + torch.arange(BATCH)) % len(data)]
        loss = model(input_ids=data[rows], labels=data[rows]).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == STEPS - 1:
            print(f"step {step} loss {loss.item():.3f} {time.perf_counter() - start:.0f} s",
                  flush=True)
    seconds = time.perf_counter() - start
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    tail = losses[-50:]
    record = {"texts": len(texts), "characters": sum(map(len, texts)),
              "tokens": data.numel(), "rows": len(data), "steps": STEPS, "batch": BATCH,
              "tokens_trained": STEPS * BATCH * LENGTH, "epochs": STEPS * BATCH / len(data),
              "train_seconds": seconds, "torch_threads": torch.get_num_threads(),
              "final_train_loss": sum(tail) / len(tail), "parameters": model.num_parameters(),
              "config": SHAPE, "vocab": VOCAB, "seed": SEED}
    (folder / "training.json").write_text(json.dumps(record, indent=1))
    return folder


def gpt2_folder(cache: Path) -> Path:
    """Return the small GPT-2's folder under `cache`, trained the first time."""
    folder = cache / NAME
    if (folder / "model.safetensors").is_file():
        return folder
    return make(folder)


if __name__ == "__main__":
    print(json.dumps(json.loads((gpt2_folder(Path(__file__).parent / ".cache" / "lm")
                                 / "training.json").read_text()), indent=1))
