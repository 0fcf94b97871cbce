"""Read a Hugging Face model folder safely and export it as a `torch.export` program.

The folder is untrusted data. Its `config.json` names an architecture, which must be a model
class of the installed `transformers` (remote code, `auto_map`, is refused); weights come only
from `*.safetensors` (pickled weight files are refused, even beside safetensors ones); the
model is built on the meta device and filled from the safetensors by `from_pretrained`, so
the weights are held once. The program takes `input_ids`, `attention_mask` (and
`token_type_ids` where the architecture has them) with a dynamic batch and sequence length,
and returns a dict: `sentence_embedding` for a sentence-transformers folder (its pooling and
normalization), else `logits` or `last_hidden_state`.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from compressor.errors import ModelFormatError, UnsafeModelError
from compressor.load.data import InputSpec
from compressor.vocabulary import HOW_TO_EXPORT

__all__ = ["Checkpoint", "TextModel", "find_root", "is_causal_lm", "read_checkpoint"]

os.environ["HF_HUB_OFFLINE"] = "1"  # a checkpoint is read from its folder, never the Hub
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

HOW_TO_SAVE = ("save it with `model.save_pretrained(folder, safe_serialization=True)` and "
               "`tokenizer.save_pretrained(folder)`")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt", "merges.txt", "vocab.json", "added_tokens.json")
SENTENCE_FILES = ("modules.json", "config_sentence_transformers.json",
                  "sentence_bert_config.json")
MAX_SMALL_FILE = 64 << 20  # config and tokenizer files are read into memory
_POOLING_MODES = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens")
_SEQUENCE_MIN = 2


@dataclass
class Checkpoint:
    """A loaded Hugging Face checkpoint: the model, its export, and the files to hand back."""

    model_class: str
    hf_model: nn.Module  # the transformers model, weights filled
    wrapper: TextModel
    input_names: list[str]
    output_name: str
    vocab_size: int
    type_vocab_size: int
    config: dict[str, Any]  # config.json as uploaded
    files: dict[str, bytes] = field(default_factory=dict)  # tokenizer and sentence files
    pad_token_id: int = 0


def is_causal_lm(checkpoint: Checkpoint) -> bool:
    """Whether transformers lists the checkpoint's class as a causal language model
    (GPT2LMHeadModel, LlamaForCausalLM, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return checkpoint.model_class in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


class TextModel(nn.Module):
    """Run a transformers model on named token inputs and return one named output."""

    def __init__(self, model: nn.Module, output_name: str, pooling: str | None,
                 normalize: bool) -> None:
        super().__init__()
        self.model = model
        self.output_name = output_name
        self.pooling = pooling
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "return_dict": True}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if "use_cache" in inspect.signature(self.model.forward).parameters:
            kwargs["use_cache"] = False
        out = self.model(**kwargs)
        if self.pooling is None:
            value = out.logits if self.output_name == "logits" else out.last_hidden_state
            return {self.output_name: value}
        embedding = pool(out.last_hidden_state, attention_mask, self.pooling)
        if self.normalize:
            embedding = nn.functional.normalize(embedding, p=2.0, dim=1)
        return {self.output_name: embedding}


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool token states (batch, seq, dim) into one vector per row as sentence-transformers do."""
    if mode == "cls_token":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max_tokens":
        return hidden.masked_fill(weights == 0, -1e9).max(dim=1).values
    total = (hidden * weights).sum(dim=1)
    count = weights.sum(dim=1).clamp(min=1e-9)
    return total / (count.sqrt() if mode == "mean_sqrt_len_tokens" else count)


def find_root(folder: Path) -> Path:
    """Return the folder holding config.json: `folder` itself or its only subfolder."""
    if (folder / "config.json").is_file():
        return folder
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")
               and p.name != "__MACOSX"]
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / "config.json").is_file():
        return entries[0]
    raise ModelFormatError(
        f"no config.json found in the checkpoint (it holds {sorted(p.name for p in entries)[:10]}"
        f"); a Hugging Face model folder has config.json and model.safetensors at its top: "
        f"{HOW_TO_SAVE}. Not a Hugging Face model? {HOW_TO_EXPORT}")


def read_checkpoint(folder: Path) -> Checkpoint:
    """Check the folder, build the model from safetensors and return the checkpoint."""
    root = find_root(folder)
    _refuse_pickles(root)
    config = _read_json(root, "config.json")
    _refuse_remote_code(config)
    model_class = _model_class(config)
    _check_weight_files(root)
    files = {name: _read_small(root / name) for name in TOKENIZER_FILES + SENTENCE_FILES
             if (root / name).is_file()}
    pooling, normalize = _sentence_layout(root, files)
    if pooling is not None:
        pooling_config = f"{_pooling_dir(files)}/config.json"
        files[pooling_config] = _read_small(root / pooling_config)
    hf_model = _load_model(root, model_class)
    if pooling is not None:
        output_name = "sentence_embedding"
    elif model_class.__name__.endswith("Model") and not model_class.__name__.endswith(
            "LMHeadModel"):
        output_name = "last_hidden_state"  # a base model: BertModel, LlamaModel, ...
    else:
        output_name = "logits"  # a model with its head: ...ForSequenceClassification, ...
    parameters = inspect.signature(hf_model.forward).parameters
    for needed in ("input_ids", "attention_mask"):
        if needed not in parameters:
            raise ModelFormatError(
                f"{model_class.__name__} takes no {needed!r}; only text models that take "
                "input_ids and attention_mask are supported")
    input_names = ["input_ids", "attention_mask"]
    type_vocab = int(getattr(hf_model.config, "type_vocab_size", 0) or 0)
    if "token_type_ids" in parameters and type_vocab > 0 and _tokenizer_gives_types(files):
        input_names.append("token_type_ids")
    wrapper = TextModel(hf_model, output_name, pooling, normalize).eval()
    return Checkpoint(model_class=model_class.__name__, hf_model=hf_model, wrapper=wrapper,
                      input_names=input_names, output_name=output_name,
                      vocab_size=int(hf_model.config.vocab_size), type_vocab_size=type_vocab,
                      config=config, files=files, pad_token_id=_pad_id(config, files))


def input_specs(checkpoint: Checkpoint, length: int) -> list[InputSpec]:
    """Return the program's inputs: token ids below the vocabulary size, masks of ones."""
    ranges = {"input_ids": (0, checkpoint.vocab_size - 1), "attention_mask": (1, 1),
              "token_type_ids": (0, 0)}
    return [InputSpec(name, (None, None), torch.int64, *ranges[name],
                      example_shape=(2, length)) for name in checkpoint.input_names]


def most_positions(checkpoint: Checkpoint) -> int | None:
    """Return the most tokens the model takes (`max_position_embeddings`, GPT-2's
    `n_positions`), or None when its config does not say."""
    return int(getattr(checkpoint.hf_model.config, "max_position_embeddings", 0) or 0) or None


def export_program(checkpoint: Checkpoint, length: int) -> ExportedProgram:
    """Export the wrapper with a dynamic batch and sequence length."""
    specs = input_specs(checkpoint, length)
    length = max(length, _SEQUENCE_MIN + 1)
    example = {"input_ids": torch.arange(2 * length).reshape(2, length) % checkpoint.vocab_size,
               "attention_mask": torch.ones(2, length, dtype=torch.int64),
               "token_type_ids": torch.zeros(2, length, dtype=torch.int64)}
    kwargs = {spec.name: example[spec.name] for spec in specs}
    batch = Dim("batch", min=1, max=2**20)
    most = most_positions(checkpoint) or 2**16
    sequence = Dim("sequence", min=_SEQUENCE_MIN, max=max(most, length))
    shapes = {name: {0: batch, 1: sequence} for name in kwargs}
    try:
        with torch.no_grad():
            return torch.export.export(checkpoint.wrapper, (), kwargs, dynamic_shapes=shapes,
                                       strict=False)
    except Exception as exc:  # torch.export raises many types; all mean "not exportable"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFormatError(
            f"{checkpoint.model_class} could not be exported with torch.export at a dynamic "
            f"batch and sequence length: {first}. Export it yourself to a .pt2 program and "
            "upload that instead") from exc


def _read_small(path: Path) -> bytes:
    if path.is_symlink():
        raise UnsafeModelError(f"{path.name} in the checkpoint is a link; links are refused")
    if not path.is_file():
        raise ModelFormatError(f"{path.parent.name}/{path.name} is missing from the checkpoint")
    if path.stat().st_size > MAX_SMALL_FILE:
        raise ModelFormatError(f"{path.name} in the checkpoint is over {MAX_SMALL_FILE} bytes")
    return path.read_bytes()


def _read_json(root: Path, name: str) -> dict[str, Any]:
    try:
        value = json.loads(_read_small(root / name))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{name} in the checkpoint is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ModelFormatError(f"{name} in the checkpoint is not a JSON object")
    return value


def _refuse_pickles(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            raise UnsafeModelError(
                f"the checkpoint holds the link {path.relative_to(root)}; links are refused, "
                "copy the file itself into the folder")
        if not path.is_file():
            continue
        with open(path, "rb") as file:
            head = file.read(2)
        if path.suffix.lower() in PICKLE_SUFFIXES or (len(head) == 2 and head[0] == 0x80
                                                       and 2 <= head[1] <= 5):
            raise UnsafeModelError(
                f"the checkpoint holds {path.relative_to(root)}, a pickle (PyTorch .bin / .pt "
                "files are pickles that can run code when loaded); pickled files are never "
                f"loaded. Remove it and give the weights as safetensors: {HOW_TO_SAVE}")


def _refuse_remote_code(config: dict[str, Any]) -> None:
    if "auto_map" in config:
        raise UnsafeModelError(
            "config.json has `auto_map`: the architecture is custom code shipped with the "
            "checkpoint, and uploaded code is never run. Use an architecture built into "
            "transformers (e.g. save the model as BertModel / LlamaForCausalLM), or export it "
            "yourself to a .pt2 program and upload that")
    if config.get("quantization_config"):
        raise ModelFormatError(
            "config.json has a `quantization_config`; give the full-precision checkpoint "
            "(the service compresses it itself)")


def _model_class(config: dict[str, Any]) -> type:
    import transformers

    names = config.get("architectures")
    if not (isinstance(names, list) and len(names) == 1 and isinstance(names[0], str)):
        raise ModelFormatError(
            f"config.json names the architecture as {names!r}; it must list exactly one "
            f"transformers model class, e.g. \"architectures\": [\"BertModel\"]. {HOW_TO_SAVE}")
    name = names[0]
    if not re.fullmatch(r"[A-Z][A-Za-z0-9]*", name):
        raise ModelFormatError(f"config.json names the unknown architecture {name!r}")
    try:
        cls = getattr(transformers, name)
    except (AttributeError, ImportError, RuntimeError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ModelFormatError(
            f"config.json names the architecture {name!r}, which the installed transformers "
            f"{transformers.__version__} does not have; use one of its model classes (e.g. "
            "BertModel, BertForSequenceClassification, LlamaForCausalLM, GPT2LMHeadModel), or "
            "export the model yourself to a .pt2 program")
    return cls


def _check_weight_files(root: Path) -> None:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        data = _read_json(root, index.name)
        shards = data.get("weight_map")
        if not isinstance(shards, dict) or not shards:
            raise ModelFormatError(f"{index.name} has no weight_map")
        for shard in set(shards.values()):
            if (not isinstance(shard, str) or "/" in shard or "\\" in shard
                    or not shard.endswith(".safetensors") or shard.startswith(".")):
                raise UnsafeModelError(
                    f"{index.name} names the shard {shard!r}; shards must be .safetensors files "
                    "beside the index")
            if not (root / shard).is_file():
                raise ModelFormatError(f"{index.name} names {shard}, which is missing")
        return
    if not (root / "model.safetensors").is_file():
        found = sorted(p.name for p in root.glob("*.safetensors"))
        raise ModelFormatError(
            "the checkpoint has no model.safetensors (nor a sharded "
            f"model.safetensors.index.json){'; it has ' + str(found) if found else ''}. "
            f"{HOW_TO_SAVE}")


def _sentence_layout(root: Path, files: dict[str, bytes]) -> tuple[str | None, bool]:
    """Return (pooling mode, normalize) from modules.json, or (None, False) without one."""
    if "modules.json" not in files:
        return None, False
    try:
        modules = json.loads(files["modules.json"])
        types = [str(m["type"]).rsplit(".", 1)[-1] for m in modules]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelFormatError(f"modules.json is not a sentence-transformers module list "
                               f"({exc})") from None
    if "Pooling" not in types:
        return None, False
    unknown = sorted(set(types) - {"Transformer", "Pooling", "Normalize"})
    if unknown:
        raise ModelFormatError(
            f"modules.json lists {unknown}; only Transformer, Pooling and Normalize modules are "
            "supported. Remove the others, or give the plain transformers model")
    pooling = json.loads(_read_small(root / _pooling_dir(files) / "config.json"))
    modes = [m for m in _POOLING_MODES if pooling.get(f"pooling_mode_{m}")]
    if len(modes) != 1:
        raise ModelFormatError(
            f"1_Pooling/config.json enables the pooling modes {modes}; exactly one of "
            f"{list(_POOLING_MODES)} is supported")
    return modes[0], "Normalize" in types


def _pooling_dir(files: dict[str, bytes]) -> str:
    modules = json.loads(files["modules.json"])
    path = next(str(m.get("path", "")) for m in modules if str(m["type"]).endswith("Pooling"))
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", path):
        raise UnsafeModelError(f"modules.json gives the pooling folder as {path!r}")
    return path


def _load_model(root: Path, model_class: type) -> nn.Module:
    """Build the model on the meta device and fill it from the safetensors files."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the job log and progress events say what happens
    hf_logging.set_verbosity_error()
    model, info = _from_pretrained(root, model_class)
    missing = sorted(info.get("missing_keys") or [])
    if missing and all(k.startswith("pooler.") for k in missing) and \
            "add_pooling_layer" in inspect.signature(model_class.__init__).parameters:
        # saved without the pooler, which the base model's last_hidden_state does not use
        model, info = _from_pretrained(root, model_class, add_pooling_layer=False)
        missing = sorted(info.get("missing_keys") or [])
    mismatched = info.get("mismatched_keys") or []
    if missing or mismatched:
        shown = missing[:5] or [str(m) for m in mismatched[:5]]
        raise ModelFormatError(
            f"the safetensors do not fill {model_class.__name__}: {len(missing)} weight(s) "
            f"missing and {len(mismatched)} of the wrong shape (e.g. {shown}); check that "
            "config.json's architectures names the class the weights were saved from")
    return model.eval()


def _pad_id(config: dict[str, Any], files: dict[str, bytes]) -> int:
    if "tokenizer_config.json" in files:
        try:
            pad = json.loads(files["tokenizer_config.json"]).get("pad_token")
        except (json.JSONDecodeError, AttributeError):
            pad = None
        if isinstance(pad, dict):
            pad = pad.get("content")
        if isinstance(pad, str) and "tokenizer.json" in files:
            from tokenizers import Tokenizer

            found = Tokenizer.from_str(files["tokenizer.json"].decode("utf-8")).token_to_id(pad)
            if found is not None:
                return int(found)
    value = config.get("pad_token_id")
    return int(value) if isinstance(value, int) and value >= 0 else 0


def _from_pretrained(root: Path, model_class: type, **extra: Any) -> tuple[nn.Module, dict]:
    try:
        return model_class.from_pretrained(
            str(root), local_files_only=True, use_safetensors=True, trust_remote_code=False,
            dtype=torch.float32, attn_implementation="eager", output_loading_info=True, **extra)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise ModelFormatError(
            f"the checkpoint could not be loaded as {model_class.__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}. "
            f"{HOW_TO_SAVE}") from None


def _tokenizer_gives_types(files: dict[str, bytes]) -> bool:
    """Whether the tokenizer returns token_type_ids: yes unless its model_input_names omit them."""
    try:
        names = json.loads(files.get("tokenizer_config.json", b"{}")).get("model_input_names")
    except (json.JSONDecodeError, AttributeError):
        return True
    return not isinstance(names, list) or "token_type_ids" in names
