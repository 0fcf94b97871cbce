"""Hand the compressed dense model back as a Hugging Face folder, packed as one zip.

The folder has the uploaded `config.json` (weights now float32; word embeddings untied when
compression made the tied copies differ), the weights as `model.safetensors`, and the tokenizer
and sentence-transformers files as uploaded. Before it is kept, it is loaded back with
`from_pretrained` and its outputs must match the verified ONNX model within the job's tolerance.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compressor.errors import ExportError, VerificationError
from compressor.export.verify import differences, onnx_session, run_onnx
from compressor.load.data import Dataset
from compressor.load.huggingface.checkpoint import Checkpoint, TextModel, read_checkpoint

__all__ = ["check_checkpoint", "write_checkpoint"]

_PREFIX = "model."  # TextModel keeps the transformers model as `self.model`
_VERIFY_SAMPLES = 32


def write_checkpoint(checkpoint: Checkpoint, module: nn.Module, folder: Path) -> None:
    """Write `module`'s weights with the checkpoint's files as a Hugging Face folder (a new
    folder at `folder`), to be checked by `check_checkpoint`."""
    folder.mkdir()
    _write_folder(checkpoint, module, folder)


def check_checkpoint(folder: Path, onnx_path: Path, held_out: Dataset, out_path: Path,
                     atol: float, rtol: float, allowance: float = 0.0) -> dict:
    """Load the folder `write_checkpoint` wrote back with `from_pretrained`, check it against
    the ONNX model (within `atol + rtol·|value| + allowance`, the allowance for the model's
    float32 noise that `verify_onnx` measured), and zip it at `out_path` (the folder is
    removed); return the parity."""
    try:
        parity = _verify(folder, onnx_path, held_out, atol, rtol, allowance)
        _pack(folder, out_path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return parity


def compressed_state(checkpoint: Checkpoint, module: nn.Module) -> dict[str, torch.Tensor]:
    """Return the compressed weights under the transformers model's own names."""
    found = {name.removeprefix(_PREFIX): tensor for name, tensor in module.state_dict().items()
             if name.startswith(_PREFIX)}
    expected = checkpoint.hf_model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for name, original in expected.items():
        tensor = found.get(name)
        if tensor is None:
            tensor = _tied_source(checkpoint, name, found)
        if tensor is None:
            raise ExportError(
                f"the compressed program has no weight for {name!r}; the Hugging Face folder "
                "cannot be written (model.onnx is unaffected). Use export.form='dense'")
        if tensor.shape != original.shape:
            raise ExportError(f"the compressed weight {name!r} has shape {tuple(tensor.shape)}, "
                              f"the model expects {tuple(original.shape)}")
        state[name] = tensor.detach().to(original.dtype).contiguous()
    return state


def _tied_source(checkpoint: Checkpoint, name: str,
                 found: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Return the weight a tied name shares storage with in the original model, if any."""
    params = dict(checkpoint.hf_model.named_parameters(remove_duplicate=False))
    target = params.get(name)
    if target is None:
        return None
    for other, tensor in params.items():
        if other != name and tensor is target and other in found:
            return found[other]
    return None


def _write_folder(checkpoint: Checkpoint, module: nn.Module, folder: Path) -> None:
    from safetensors.torch import save_file

    state = compressed_state(checkpoint, module)
    config = dict(checkpoint.config)
    config.pop("torch_dtype", None)
    config["dtype"] = "float32"
    if _tied_groups_differ(checkpoint, state):
        config["tie_word_embeddings"] = False
    shared: dict[int, str] = {}
    unique = {}
    for name, tensor in state.items():  # safetensors stores each tensor once
        key = tensor.data_ptr()
        if key in shared:
            tensor = tensor.clone()
        shared.setdefault(key, name)
        unique[name] = tensor
    save_file(unique, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name, content in checkpoint.files.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)


def _tied_groups_differ(checkpoint: Checkpoint, state: dict[str, torch.Tensor]) -> bool:
    params = list(checkpoint.hf_model.named_parameters(remove_duplicate=False))
    for i, (name, tensor) in enumerate(params):
        for other, other_tensor in params[i + 1:]:
            if tensor is other_tensor and not torch.equal(state[name], state[other]):
                return True
    return False


def _verify(folder: Path, onnx_path: Path, held_out: Dataset, atol: float, rtol: float,
            allowance: float) -> dict:
    """Load the folder back with from_pretrained; its outputs must match the ONNX model's."""
    reloaded = read_checkpoint(folder)
    model: TextModel = reloaded.wrapper
    rows = torch.arange(min(len(held_out), _VERIFY_SAMPLES))
    batch = {name: tensor for name, tensor in held_out.take(rows).items()
             if name in reloaded.input_names}
    with torch.no_grad():
        (expected,) = model(**batch).values()
    output_name = reloaded.output_name
    del model, reloaded  # the reloaded weights are freed before onnxruntime loads its own
    (actual,) = run_onnx(onnx_session(onnx_path, prepack=False), batch)
    want = expected.numpy()
    worst, excess = (differences(want, actual, atol, rtol, allowance)
                     if want.shape == actual.shape else (float("inf"), float("inf")))
    if excess > 0 or not np.isfinite(worst):
        raise VerificationError(
            f"the Hugging Face folder loaded with from_pretrained disagrees with model.onnx on "
            f"{output_name}: max |difference| {worst:.3g} (shapes {want.shape} and "
            f"{actual.shape}) exceeds atol={atol:g} + rtol={rtol:g}·|value| + {allowance:.3g} "
            "(export.noise_multiple × the float32 noise floor). Nothing was kept; "
            "raise export.atol / export.rtol if this precision is acceptable")
    return {"passed": True, "samples": len(rows), "loaded_with": "from_pretrained",
            "output": output_name, "max_abs_diff": worst}


def _pack(folder: Path, out_path: Path) -> None:
    """Zip the folder's files (at the zip's top level) into `out_path`, atomically."""
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w") as archive:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    method = (zipfile.ZIP_STORED if path.suffix == ".safetensors"
                              else zipfile.ZIP_DEFLATED)
                    archive.write(path, path.relative_to(folder).as_posix(), compress_type=method)
        os.replace(tmp, out_path)
    finally:
        Path(tmp).unlink(missing_ok=True)
