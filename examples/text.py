"""The text example: a small transformer encoder that tells which stdlib area a docstring is from.

The corpus is the docstrings of the public functions, classes and methods of a fixed list of
standard-library modules, grouped into six balanced classes. It ships with every CPython, so
nothing is downloaded; its exact size depends on the Python version.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
import warnings
from collections import Counter, defaultdict

import torch
from sklearn.model_selection import train_test_split
from torch import nn

# Class name -> the modules whose docstrings belong to it (space-separated, sorted).
MODULE_GROUPS: dict[str, str] = {
    "concurrency": (
        "asyncio concurrent.futures contextvars multiprocessing queue sched subprocess threading"
    ),
    "dev_tools": (
        "abc argparse ast contextlib copy dataclasses doctest enum functools gc inspect "
        "itertools logging optparse pdb traceback typing unittest warnings weakref"
    ),
    "files_os": (
        "bz2 filecmp fnmatch glob gzip io lzma mmap os pathlib platform shutil signal "
        "stat sysconfig tarfile tempfile zipfile"
    ),
    "math_time": (
        "calendar cmath datetime decimal fractions math numbers random statistics time zoneinfo"
    ),
    "network": (
        "email.message email.utils ftplib http.client http.cookiejar imaplib ipaddress "
        "poplib smtplib socket ssl urllib.parse urllib.request"
    ),
    "text_data": (
        "base64 codecs configparser csv difflib html.parser json pickle plistlib re "
        "shlex sqlite3 string struct textwrap tokenize xml.dom.minidom "
        "xml.etree.ElementTree"
    ),
}
CLASSES = tuple(sorted(MODULE_GROUPS))
PAD, UNK = 0, 1
SEQ_LEN = 64
VOCAB_WORDS = 2000
_WORD = re.compile(r"[a-z0-9_]+")


def _owned_by(obj: object, module_name: str) -> bool:
    """Tell whether `obj` is defined by `module_name`'s package (or its C accelerator)."""
    owner = (getattr(obj, "__module__", None) or "").lstrip("_")
    top = module_name.split(".")[0]
    return owner == top or owner.startswith(top + ".") or owner in ("posix", "socket")


def _docstrings(module_name: str) -> list[str]:
    """Return the docstrings of a module's public functions, classes and their methods."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = importlib.import_module(module_name)
    docs = []
    for name, obj in inspect.getmembers(module):
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if not _owned_by(obj, module_name):
            continue
        docs.append(inspect.getdoc(obj))
        if inspect.isclass(obj):
            for attr_name, attr in sorted(vars(obj).items()):
                attr = getattr(attr, "__func__", attr)  # unwrap staticmethod / classmethod
                if not attr_name.startswith("_") and (
                    inspect.isroutine(attr) or isinstance(attr, property)
                ):
                    docs.append(inspect.getdoc(attr))
    return [doc for doc in docs if doc and _WORD.search(doc.lower())]


def load_corpus(per_class: int | None = None, seed: int = 0) -> tuple[list[str], list[int]]:
    """Return (docstrings, class indices into CLASSES), with every class the same size.

    A docstring found in two classes is dropped; each class is sampled down (with `seed`) to
    the smallest class's size, or to `per_class` when that is smaller. Modules that fail to
    import are skipped.
    """
    found: dict[str, set[str]] = defaultdict(set)
    for label in CLASSES:
        for module_name in MODULE_GROUPS[label].split():
            try:
                docs = _docstrings(module_name)
            except ImportError:
                continue
            for doc in docs:
                found[doc].add(label)
    by_class: dict[str, list[str]] = {label: [] for label in CLASSES}
    for doc, labels in sorted(found.items()):
        if len(labels) == 1:
            by_class[labels.pop()].append(doc)
    size = min(len(docs) for docs in by_class.values())
    size = min(size, per_class) if per_class else size
    rng = random.Random(seed)
    texts, targets = [], []
    for index, label in enumerate(CLASSES):
        texts += rng.sample(by_class[label], size)
        targets += [index] * size
    return texts, targets


def words(text: str) -> list[str]:
    """Split text into lowercase word tokens."""
    return _WORD.findall(text.lower())


def build_vocab(texts: list[str], size: int = VOCAB_WORDS) -> dict[str, int]:
    """Map the `size` most frequent words (ties broken alphabetically) to ids 2..; 0 is PAD, 1 UNK."""
    counts = Counter(word for text in texts for word in words(text))
    ranked = sorted(counts, key=lambda word: (-counts[word], word))[:size]
    return {word: index + 2 for index, word in enumerate(ranked)}


def encode(
    texts: list[str], vocab: dict[str, int], seq_len: int = SEQ_LEN
) -> dict[str, torch.Tensor]:
    """Return `input_ids` and `attention_mask` (int64, (N, seq_len)) for the first seq_len words."""
    input_ids = torch.full((len(texts), seq_len), PAD, dtype=torch.int64)
    for row, text in enumerate(texts):
        ids = [vocab.get(word, UNK) for word in words(text)[:seq_len]]
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return {"input_ids": input_ids, "attention_mask": (input_ids != PAD).long()}


def load_split(
    per_class: int | None = None, seed: int = 0
) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor], torch.Tensor, int]:
    """Return (train inputs, train labels, test inputs, test labels, vocab size): stratified 80/20.

    The vocabulary is built from the training split only.
    """
    texts, targets = load_corpus(per_class, seed)
    train_texts, test_texts, train_labels, test_labels = train_test_split(
        texts, targets, test_size=0.2, random_state=seed, stratify=targets
    )
    vocab = build_vocab(train_texts)
    return (
        encode(train_texts, vocab),
        torch.tensor(train_labels),
        encode(test_texts, vocab),
        torch.tensor(test_labels),
        len(vocab) + 2,
    )


class SelfAttention(nn.Module):
    """Multi-head self-attention from explicit q, k, v and output projections."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """Reshape (b, t, d) to (b, heads, t, d / heads)."""
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """Attend over the tokens; `padding` is (b, 1, 1, t), True where a key is padding."""
        q, k, v = (self._split_heads(proj(x)) for proj in (self.query, self.key, self.value))
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        # -1e4, not -inf or the dtype minimum: stays finite under fp16/bf16 autocast too.
        weights = torch.softmax(scores.masked_fill(padding, -1e4), dim=-1)
        return self.out((weights @ v).transpose(1, 2).flatten(2))


class EncoderLayer(nn.Module):
    """A pre-norm transformer encoder layer: self-attention, then a GELU MLP, each residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp_in = nn.Linear(dim, mlp_ratio * dim)
        self.mlp_out = nn.Linear(mlp_ratio * dim, dim)
        self.dropout = nn.Dropout(dropout)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        """Apply dropout in training only, so the exported (eval) graph has no dropout op."""
        return self.dropout(x) if self.training else x

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        x = x + self._drop(self.attention(self.norm1(x), padding))
        mlp = self.mlp_out(nn.functional.gelu(self.mlp_in(self.norm2(x))))
        return x + self._drop(mlp)


class TextClassifier(nn.Module):
    """Token and learned position embeddings, encoder layers, masked mean pooling, a classifier.

    Returns (logits (b, classes), hidden_states (b, t, dim)).
    """

    def __init__(
        self,
        vocab_size: int,
        classes: int = len(CLASSES),
        seq_len: int = SEQ_LEN,
        dim: int = 64,
        heads: int = 4,
        layers: int = 2,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(torch.randn(1, seq_len, dim) * 0.02)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, classes)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(input_ids) + self.position  # the sequence length is fixed: SEQ_LEN
        padding = (attention_mask == 0)[:, None, None, :]
        for layer in self.layers:
            h = layer(h, padding)
        h = self.norm(h)
        keep = attention_mask.unsqueeze(-1)  # int64; multiplying promotes it, no cast op
        pooled = (h * keep).sum(1) / keep.sum(1).clamp(min=1)
        return self.classifier(pooled), h
