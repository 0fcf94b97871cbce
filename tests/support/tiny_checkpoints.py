"""Tiny Hugging Face checkpoints built from configs, with a real tokenizer, saved as folders."""

from __future__ import annotations

import json
import tarfile
import zipfile
from pathlib import Path

import torch

WORDS = ("the a of to and in is it for on with as by this that from be are or an at not "
         "return value list string number file path module object function class data name "
         "new given default true false none error type first last each line text byte").split()
SENTENCES = [f"{WORDS[i % len(WORDS)]} {WORDS[(3 * i + 1) % len(WORDS)]} "
             f"{WORDS[(7 * i + 2) % len(WORDS)]} {WORDS[(5 * i + 3) % len(WORDS)]}"
             + (" " + WORDS[(11 * i) % len(WORDS)]) * (i % 4) for i in range(80)]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
VOCAB_SIZE = 96


def save_tokenizer(folder: Path, bos_eos: bool = False) -> None:
    """Write a word-level tokenizer.json over WORDS (BERT-style [CLS] x [SEP] by default)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    if not bos_eos:
        tokenizer.post_processor = TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"pad_token": "[PAD]", "unk_token": "[UNK]", "tokenizer_class": "PreTrainedTokenizerFast"}))


def bert_config(**extra):
    from transformers import BertConfig

    return BertConfig(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                      **extra)


def save_checkpoint(kind: str, folder: Path) -> Path:
    """Save a tiny `kind` checkpoint (sentence, classifier, masked, llama, gpt2) with a
    tokenizer in `folder`."""
    from transformers import (
        BertForMaskedLM,
        BertForSequenceClassification,
        BertModel,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "sentence":
        model = BertModel(bert_config(), add_pooling_layer=False)
    elif kind == "classifier":
        model = BertForSequenceClassification(bert_config(num_labels=3))
    elif kind == "masked":  # sequence logits over the vocabulary, as a causal LM's, not causal
        model = BertForMaskedLM(bert_config())
    elif kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=2, eos_token_id=3))
    elif kind == "gpt2":  # Conv1D projections (weights stored (in, out)), a tied LM head
        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=VOCAB_SIZE, n_embd=32, n_layer=2, n_head=4, n_positions=64,
            pad_token_id=0, bos_token_id=2, eos_token_id=3))
    else:
        raise ValueError(kind)
    model.eval().save_pretrained(folder, safe_serialization=True)
    save_tokenizer(folder, bos_eos=kind in ("llama", "gpt2"))
    if kind == "sentence":
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                   {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
        (folder / "modules.json").write_text(json.dumps(modules))
        (folder / "1_Pooling").mkdir(exist_ok=True)
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": 32, "pooling_mode_cls_token": False,
             "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
             "pooling_mode_mean_sqrt_len_tokens": False}))
    return folder


def write_text(path: Path, lines: list[str] = SENTENCES, jsonl: bool = False) -> Path:
    """Write the samples as .txt (a line each) or .jsonl (a "text" field each)."""
    rows = [json.dumps({"text": line}) for line in lines] if jsonl else lines
    path.write_text("\n".join(rows) + "\n")
    return path


def zip_folder(folder: Path, archive: Path, top: str = "") -> Path:
    """Zip the folder's files, under `top/` if given."""
    with zipfile.ZipFile(archive, "w") as out:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                out.write(path, (Path(top) / path.relative_to(folder)).as_posix())
    return archive


def tar_folder(folder: Path, archive: Path) -> Path:
    """Pack the folder as a .tar.gz with the files at its top."""
    with tarfile.open(archive, "w:gz") as out:
        for path in sorted(folder.rglob("*")):
            out.add(path, path.relative_to(folder).as_posix(), recursive=False)
    return archive
