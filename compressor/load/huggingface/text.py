"""Turn a text data file into token inputs with the checkpoint's own tokenizer.

`.txt`: one sample a line (blank lines skipped). `.jsonl`: one JSON object a line with a string
`text` field. Each sample is tokenized by `tokenizer.json` (the `tokenizers` library, which reads
data and runs no code) and padded to the longest sample. A text longer than `max_length` tokens
is cut into windows of `max_length` for a causal language model, so that every token is
trained on and every held-out token counts in the perplexity; for any other model (an encoder
reads a text whole: a window would be another text) it is truncated.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compressor.errors import DataError
from compressor.load.data import Dataset
from compressor.load.huggingface.checkpoint import Checkpoint

__all__ = ["TEXT_SUFFIXES", "read_texts", "tokenize"]

TEXT_SUFFIXES = (".txt", ".jsonl")
MAX_LINE_BYTES = 1 << 20


def read_texts(path: Path, max_samples: int) -> list[str]:
    """Return up to `max_samples` non-empty samples of a .txt or .jsonl file."""
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES:
        raise DataError(f"{path.name} is not a .txt or .jsonl text file")
    texts: list[str] = []
    with open(path, "rb") as file:
        for number, raw in enumerate(file, start=1):
            if len(texts) >= max_samples:
                break
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(f"data file {path.name}: line {number} is over {MAX_LINE_BYTES} "
                                "bytes; give one sample a line")
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise DataError(f"data file {path.name}: line {number} is not UTF-8 text; save "
                                "the file as UTF-8") from None
            if not line:
                continue
            if suffix == ".jsonl":
                line = _jsonl_text(path, number, line)
                if not line.strip():
                    continue
            texts.append(line)
    if len(texts) < 2:
        raise DataError(
            f"data file {path.name} holds {len(texts)} sample(s); at least 2 are needed (some are "
            "held out for evaluation). Give one sample a line"
            + (", as {\"text\": \"...\"}" if suffix == ".jsonl" else ""))
    return texts


def _jsonl_text(path: Path, number: int, line: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"data file {path.name}: line {number} is not JSON ({exc}); a .jsonl "
                        "file has one object a line, e.g. {\"text\": \"a sample\"}") from None
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise DataError(f"data file {path.name}: line {number} has no string field \"text\"; "
                        "write one object a line, e.g. {\"text\": \"a sample\"}")
    return text


def tokenize(checkpoint: Checkpoint, path: Path, max_length: int, max_samples: int,
             *, windows: bool = False) -> Dataset:
    """Tokenize the text file at `path` into the checkpoint's inputs: at most `max_samples`
    rows, each text's tokens past `max_length` in windows of their own when `windows`,
    truncated otherwise."""
    from tokenizers import Tokenizer

    if "tokenizer.json" not in checkpoint.files:
        raise DataError(
            "text data needs the checkpoint's tokenizer.json, and it has none; save a fast "
            "tokenizer beside the model with `tokenizer.save_pretrained(folder)`, or send "
            "token ids as a .safetensors file instead")
    texts = read_texts(path, max_samples)
    try:
        tokenizer = Tokenizer.from_str(checkpoint.files["tokenizer.json"].decode("utf-8"))
    except Exception as exc:  # noqa: BLE001 - the Rust library raises its own exception type
        raise DataError(f"the checkpoint's tokenizer.json cannot be read ({exc})") from None
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    encodings = tokenizer.encode_batch(texts)
    if windows:
        encodings = [window for e in encodings for window in (e, *e.overflowing)]
        encodings = encodings[:max_samples]
    longest = max(2, max(len(e.ids) for e in encodings))  # the program's least length: 2
    rows = len(encodings)
    ids = torch.full((rows, longest), checkpoint.pad_token_id, dtype=torch.int64)
    mask = torch.zeros(rows, longest, dtype=torch.int64)
    types = torch.zeros(rows, longest, dtype=torch.int64)
    for row, encoding in enumerate(encodings):
        count = len(encoding.ids)
        ids[row, :count] = torch.tensor(encoding.ids, dtype=torch.int64)
        mask[row, :count] = 1
        types[row, :count] = torch.tensor(encoding.type_ids, dtype=torch.int64)
    if rows and (empty := (mask.sum(1) == 0).nonzero()).numel():
        raise DataError(f"data file {path.name}: sample {int(empty[0])} has no tokens")
    if int(ids.max()) >= checkpoint.vocab_size:
        raise DataError(
            f"the tokenizer gives token id {int(ids.max())}, but the model's vocabulary has "
            f"{checkpoint.vocab_size} entries; the tokenizer files do not belong to this model")
    if checkpoint.type_vocab_size and int(types.max()) >= checkpoint.type_vocab_size:
        types = types.clamp(max=checkpoint.type_vocab_size - 1)
    inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return Dataset({name: inputs[name] for name in checkpoint.input_names}, synthetic=False,
                   source=path.name)
