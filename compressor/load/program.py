"""Load an uploaded `.pt2` program without ever executing code from the file.

The upload is untrusted, and `torch.export.load` unpickles parts of the archive with
`weights_only=False` (pickled weights and constants, opaque objects, sample inputs as a fallback).
So loading is defense in depth:

1. the file must be a zip holding one `torch.export` program; torch.save files, raw pickles and
   anything else are refused with a message that says how to export a `.pt2`;
2. every pickled member is read first with torch's restricted unpickler (`weights_only=True`,
   which builds tensors and plain containers and runs nothing); Python objects that only
   `pickle` can rebuild, compiled native code and legacy pickled weight files are refused;
3. only then does torch deserialize the program, and while it runs `torch.load` is forced to
   `weights_only=True` and the other unpicklers it calls refuse, so even a gap in step 2
   executes nothing;
4. the program may call only operators (no arbitrary Python callables), and every input must be
   a tensor with a dynamic batch dimension;
5. what the pipeline cannot compress or verify is refused with what to do (scalar outputs such
   as a loss, bfloat16 tensors onnxruntime cannot run), and guards that only describe how the
   example inputs were stored are dropped (see `compressor.load.guards`).
"""

from __future__ import annotations

import codecs
import io
import json
import operator
import pickle
import re
import threading
import types
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.export import ExportedProgram

from compressor.errors import ModelFormatError, UnsafeModelError, UnsupportedModelError
from compressor.load.guards import drop_aliasing_guards_
from compressor.vocabulary import HOW_TO_EXPORT, HOW_TO_GIVE_CHECKPOINT

__all__ = ["load_program"]

MAX_UNCOMPRESSED_BYTES = 64 << 30  # sum of the members' uncompressed sizes
MAX_COMPRESSION_RATIO = 1000  # per member, for members of at least RATIO_CHECK_MIN_BYTES
RATIO_CHECK_MIN_BYTES = 1 << 20
MODEL_NAME = "model"  # the program torch.export.save writes, and the only one we accept

_DESERIALIZE_LOCK = threading.Lock()
# torch's words when a program calls an operator that is not registered in this process.
_UNKNOWN_OPERATOR = re.compile(r"failed to resolve (torch\.ops\.[\w.]+) to an operator")

# Python callables (besides operators) that a well-formed program may call: symbolic-shape
# arithmetic and grad / autocast switches. torch's own verifier allows the same.
_SAFE_CALLABLES = frozenset(
    {
        torch.sym_int, torch.sym_float, torch.sym_ite, torch.sym_max, torch.sym_min,
        torch.sym_not, torch.sym_sqrt, torch.sym_sum, torch._C._set_grad_enabled,
        torch.autograd.grad_mode.set_grad_enabled, torch.amp.autocast_mode._enter_autocast,
        torch.amp.autocast_mode._exit_autocast,
    }
)


def load_program(path: str | Path) -> ExportedProgram:
    """Load the `torch.export` program at `path` without running any code from the file.

    Raises `UnsafeModelError` when the file holds anything that would need code execution to
    load, and `ModelFormatError` for every other file that is not a usable `.pt2` program.
    """
    path = Path(path)
    _check_readable(path)
    with _open_zip(path) as archive:
        _check_zip_sizes(path, archive)
        root = _single_root(path, archive)
        if not _has(archive, f"{root}/archive_format"):
            _refuse_other_zip(path, archive, root)
        _check_pt2_layout(path, archive, root)
        _check_pickled_members(path, archive, root)
    program = _deserialize(path)
    _check_operators(path, program)
    _check_inputs(path, program)
    _check_outputs(path, program)
    _check_dtypes(path, program)
    drop_aliasing_guards_(program)
    return program


# -- step 1: what kind of file is it --------------------------------------------------------


def _check_readable(path: Path) -> None:
    if not path.is_file():
        raise ModelFormatError(f"model file {path.name} not found or not a regular file")
    if path.stat().st_size == 0:
        raise ModelFormatError(
            f"{path.name} is empty (0 bytes); upload the .pt2 file written by torch.export.save"
        )


@contextmanager
def _open_zip(path: Path) -> Iterator[zipfile.ZipFile]:
    with path.open("rb") as f:
        head = f.read(4096)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise _not_a_zip(path, head, exc) from None
    with archive:
        yield archive


def _not_a_zip(path: Path, head: bytes, exc: Exception) -> ModelFormatError:
    name = path.name
    if head.startswith(b"PK"):
        return ModelFormatError(
            f"{name} starts like a zip archive but cannot be read ({exc}): it is truncated or "
            "corrupt. Upload the complete .pt2 file again."
        )
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return UnsafeModelError(
            f"{name} is a raw Python pickle (protocol {head[1]}), e.g. torch.save with the "
            "legacy format or pickle.dump; unpickling it could run code from the file, so it "
            f"is refused. {HOW_TO_EXPORT}"
        )
    if b"\0" not in head:
        try:  # the incremental decoder accepts a character cut at the end of `head`
            text = codecs.getincrementaldecoder("utf-8")().decode(head)
        except UnicodeDecodeError:
            pass
        else:
            start = text.strip().splitlines()[0][:40] if text.strip() else ""
            return ModelFormatError(
                f"{name} is a text file (starts with {start!r}), not a .pt2 program. "
                f"{HOW_TO_EXPORT}"
            )
    return ModelFormatError(
        f"{name} is not a .pt2 program (not a zip archive; first bytes {head[:8].hex()}). "
        f"{HOW_TO_EXPORT}"
    )


def _check_zip_sizes(path: Path, archive: zipfile.ZipFile) -> None:
    infos = archive.infolist()
    names = [info.filename for info in infos]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise ModelFormatError(
            f"{path.name} lists the member {duplicate!r} more than once; a .pt2 written by "
            "torch.export.save never does. Export and save the program again."
        )
    total = sum(info.file_size for info in infos)
    if total > MAX_UNCOMPRESSED_BYTES:
        raise ModelFormatError(
            f"{path.name} would unpack to {total / 2**30:.1f} GiB, more than the limit of "
            f"{MAX_UNCOMPRESSED_BYTES / 2**30:.0f} GiB; it was refused as a likely zip bomb"
        )
    for info in infos:
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size >= RATIO_CHECK_MIN_BYTES and ratio > MAX_COMPRESSION_RATIO:
            raise ModelFormatError(
                f"{path.name}: member {info.filename} is compressed {ratio:.0f}:1, more than "
                f"the limit of {MAX_COMPRESSION_RATIO}:1; it was refused as a likely zip bomb"
            )


def _single_root(path: Path, archive: zipfile.ZipFile) -> str:
    """Return the one top folder every member lives in (torch reads records relative to it)."""
    roots = {name.split("/", 1)[0] if "/" in name else "" for name in archive.namelist()}
    if len(roots) != 1 or "" in roots:
        raise ModelFormatError(
            f"{path.name} is a zip archive but neither a .pt2 program nor a Hugging Face model "
            f"folder: its members are not all in one top folder (found {sorted(roots)[:5]}) and "
            f"none is a config.json at its top. {HOW_TO_GIVE_CHECKPOINT} Not a Hugging Face model? "
            f"{HOW_TO_EXPORT}"
        )
    return roots.pop()


def _has(archive: zipfile.ZipFile, name: str) -> bool:
    try:
        archive.getinfo(name)
    except KeyError:
        return False
    return True


def _some_members(archive: zipfile.ZipFile, shown: int = 5) -> str:
    """Return the first few member names of `archive`, for a message."""
    names = archive.namelist()
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _refuse_other_zip(path: Path, archive: zipfile.ZipFile, root: str) -> None:
    if not _has(archive, f"{root}/data.pkl"):
        raise ModelFormatError(
            f"{path.name} is a zip archive but neither a .pt2 program (it has no archive_format "
            f"member) nor a Hugging Face model folder (it has no config.json at its top; it "
            f"holds {_some_members(archive)}). {HOW_TO_GIVE_CHECKPOINT} Not a Hugging Face model? "
            f"{HOW_TO_EXPORT}"
        )
    try:  # the restricted unpickler: builds tensors and containers, runs nothing
        content = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise UnsafeModelError(
            f"{path.name} is a pickled Python object saved with torch.save (e.g. a whole "
            "nn.Module, torch.save(model)); unpickling it would run code from the file, so it "
            f"is refused. {HOW_TO_EXPORT}"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for a corrupt file
        raise ModelFormatError(
            f"{path.name} looks like a torch.save file but cannot be read ({_first_line(exc)})."
            f" {HOW_TO_EXPORT}"
        ) from None
    if isinstance(content, dict):
        keys = ", ".join(repr(k) for k in list(content)[:3])
        raise ModelFormatError(
            f"{path.name} is a bare state_dict (or checkpoint dict) saved with torch.save "
            f"(keys {keys}, ...): it holds weights but not the model's code, so it cannot be "
            f"compressed on its own. Load it into your model, then export: {HOW_TO_EXPORT}"
        )
    raise ModelFormatError(
        f"{path.name} is a torch.save file holding a {type(content).__name__}, not a program. "
        f"{HOW_TO_EXPORT}"
    )


# -- step 2: the pt2 archive's members ------------------------------------------------------


def _check_pt2_layout(path: Path, archive: zipfile.ZipFile, root: str) -> None:
    fmt = _read(path, archive, f"{root}/archive_format").decode("utf-8", "replace").strip()
    if fmt != "pt2":
        raise ModelFormatError(
            f"{path.name}: archive_format is {fmt!r}, expected 'pt2'. {HOW_TO_EXPORT}"
        )
    members = [name[len(root) + 1 :] for name in archive.namelist()]
    models = sorted(m[len("models/") : -len(".json")] for m in members
                    if m.startswith("models/") and m.endswith(".json"))
    if models != [MODEL_NAME]:
        raise ModelFormatError(
            f"{path.name} holds {len(models)} programs ({', '.join(models) or 'none'}); exactly "
            f"one, named {MODEL_NAME!r}, is needed. Save a single program with "
            "torch.export.save(program, 'model.pt2')."
        )
    if any(m.startswith("data/aotinductor/") for m in members):
        raise UnsafeModelError(
            f"{path.name} contains AOTInductor-compiled native code, which would be loaded and "
            "run; it is refused. Upload the program saved with torch.export.save, not an "
            "AOTInductor package."
        )
    for legacy in (f"data/weights/{MODEL_NAME}.pt", f"data/constants/{MODEL_NAME}.pt"):
        if legacy in members:
            raise UnsafeModelError(
                f"{path.name} stores its {legacy.split('/')[1]} in the legacy pickled file "
                f"{legacy}, which contains serialized Python objects that would need code "
                "execution to load; it is refused. Save the program again with a current "
                "torch.export.save."
            )


def _check_pickled_members(path: Path, archive: zipfile.ZipFile, root: str) -> None:
    """Read every pickled member with the restricted unpickler before torch sees it."""
    for kind in ("weights", "constants"):
        config_member = f"{root}/data/{kind}/{MODEL_NAME}_{kind}_config.json"
        config = _payload_config(path, archive, config_member)
        for fqn, payload in config.items():
            name = payload.get("path_name") if isinstance(payload, dict) else None
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise ModelFormatError(
                    f"{path.name}: {kind} entry {fqn!r} has an invalid path_name {name!r}; "
                    "the archive is corrupt. Export and save the program again."
                )
            if name.startswith(("custom_obj_", "opaque_obj_")):
                raise UnsafeModelError(
                    f"{path.name}: constant {fqn!r} ({name}) contains serialized Python objects "
                    "(a torchbind or opaque object) that would need code execution to load; "
                    "it is refused. Export a program whose constants are plain tensors."
                )
            if kind == "constants" and not name.startswith("tensor_"):
                raise ModelFormatError(
                    f"{path.name}: constant {fqn!r} has the unsupported kind {name!r}"
                )
            if payload.get("use_pickle"):
                member = f"{root}/data/{kind}/{name}"
                _check_restricted_pickle(path, member, _read(path, archive, member))
    sample_inputs = f"{root}/data/sample_inputs/{MODEL_NAME}.pt"
    if _has(archive, sample_inputs):
        payload = _read(path, archive, sample_inputs)
        if payload:
            _check_restricted_pickle(path, sample_inputs, payload)


def _payload_config(path: Path, archive: zipfile.ZipFile, member: str) -> dict:
    try:
        config = json.loads(_read(path, archive, member))["config"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelFormatError(
            f"{path.name}: {member} is not a valid payload config ({_first_line(exc)}); the "
            "archive is corrupt. Export and save the program again."
        ) from None
    if not isinstance(config, dict):
        raise ModelFormatError(f"{path.name}: {member} is not a valid payload config")
    return config


def _read(path: Path, archive: zipfile.ZipFile, member: str) -> bytes:
    try:
        return archive.read(member)
    except KeyError:
        raise ModelFormatError(
            f"{path.name} lacks the member {member}; the archive is incomplete. Export and save "
            "the program again."
        ) from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ModelFormatError(f"{path.name}: member {member} is corrupt ({exc})") from None


def _check_restricted_pickle(path: Path, member: str, payload: bytes) -> None:
    try:
        torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise UnsafeModelError(
            f"{path.name}: member {member} contains serialized Python objects that would need "
            f"code execution to load ({_unpickling_reason(exc)}); the file was refused. Export the program "
            "again from plain tensors and save it with torch.export.save."
        ) from None
    except Exception as exc:  # noqa: BLE001 - any failure means a corrupt member
        raise ModelFormatError(
            f"{path.name}: member {member} is not a readable tensor payload "
            f"({_first_line(exc)}); the archive is corrupt. Export and save the program again."
        ) from None


# -- step 3: deserialize with every unpickler locked down -----------------------------------


def _deserialize(path: Path) -> ExportedProgram:
    # load_pt2 is what torch.export.load calls; calling it directly keeps the real reason of a
    # failure (torch.export.load logs it and retries a legacy, pickle-based format instead).
    from torch.export.pt2_archive._package import load_pt2

    try:
        with _restricted_unpicklers():
            programs = load_pt2(str(path)).exported_programs
    except Exception as exc:  # noqa: BLE001 - any deserializer failure is a bad file
        cause = _innermost(exc)
        if isinstance(cause, (UnsafeModelError, pickle.UnpicklingError)):
            raise UnsafeModelError(
                f"{path.name} contains serialized Python objects that would need code execution"
                f" to load ({_unpickling_reason(cause)}); it was refused."
            ) from None
        operator = _UNKNOWN_OPERATOR.search(str(cause))
        if operator and operator.group(1).startswith(("torch.ops.aten.", "torch.ops.prims.")):
            raise ModelFormatError(
                f"{path.name} calls the operator {operator.group(1)}, which torch "
                f"{torch.__version__} (the service's) does not have; export the model with that "
                "torch version and save the program again."
            ) from None
        if operator:
            raise UnsupportedModelError(
                f"{path.name} calls the custom operator {operator.group(1)}, which this service "
                "does not have (it loads only the operators that ship with torch, and never "
                "code from the upload). Write that operation in plain torch code, export the "
                "model again and save the program."
            ) from None
        raise ModelFormatError(
            f"{path.name} could not be deserialized as a torch.export program ({_reason(exc)})."
            f" Export it with the same torch version as "
            f"the service ({torch.__version__}) and save it with torch.export.save."
        ) from None
    if MODEL_NAME not in programs:
        raise ModelFormatError(f"{path.name} holds no program named {MODEL_NAME!r}")
    return programs[MODEL_NAME]


@contextmanager
def _restricted_unpicklers() -> Iterator[None]:
    """Force `torch.load` to `weights_only=True` and make torch's other unpicklers refuse.

    The patches are process-wide, so one lock serializes every deserialization.
    """
    from torch.export.pt2_archive import _package

    def refuse(*args: object, **kwargs: object) -> None:
        raise UnsafeModelError(
            "the model file contains serialized Python objects that would need code execution "
            "to load; it was refused"
        )

    original_load = torch.load

    def weights_only_load(*args: object, **kwargs: object) -> object:
        kwargs["weights_only"] = True
        return original_load(*args, **kwargs)

    refusing_pickle = types.SimpleNamespace(**{**vars(pickle), "loads": refuse, "load": refuse})
    with _DESERIALIZE_LOCK:
        saved = (torch.load, _package.pickle, torch._C._pickle_load_obj)
        torch.load, _package.pickle, torch._C._pickle_load_obj = (
            weights_only_load, refusing_pickle, refuse
        )
        try:
            yield
        finally:
            torch.load, _package.pickle, torch._C._pickle_load_obj = saved


# -- step 4: what the program may do and take -----------------------------------------------


def _check_operators(path: Path, program: ExportedProgram) -> None:
    """Refuse a graph that calls anything but operators: a callable could be any function."""
    for module in program.graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op in ("call_module", "call_method"):
                raise ModelFormatError(f"{path.name}: node {node.name} is a {node.op}")
            if node.op != "call_function":
                continue
            target = node.target
            if isinstance(target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)):
                continue
            if target in _SAFE_CALLABLES or _is_builtin_arithmetic(target):
                continue
            raise UnsafeModelError(
                f"{path.name}: node {node.name} calls {target!r}, which is not an operator; "
                "a program may call only torch operators. Export the model again with "
                "torch.export.export."
            )


def _is_builtin_arithmetic(target: object) -> bool:
    module = getattr(target, "__module__", None)
    name = getattr(target, "__name__", "")
    if module == "math":
        return True
    return module == "_operator" and getattr(operator, name, None) is target


def _check_inputs(path: Path, program: ExportedProgram) -> None:
    names = list(program.graph_signature.user_inputs)
    if not names:
        raise ModelFormatError(
            f"{path.name}: the program takes no inputs; export it with example inputs. "
            f"{HOW_TO_EXPORT}"
        )
    in_spec = program.call_spec.in_spec
    if in_spec is not None and not all(
        leaf.is_leaf() for part in in_spec.children() for leaf in part.children()
    ):
        raise ModelFormatError(
            f"{path.name}: the program's inputs are nested (lists, tuples or dicts of tensors); "
            "only plain tensor arguments are supported. Wrap the model in a module whose "
            "forward takes one tensor per argument, and export that."
        )
    values = {n.name: n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"}
    for name in names:
        value = values.get(name)
        if not isinstance(value, torch.Tensor):
            raise ModelFormatError(
                f"{path.name}: input {name!r} is a {type(value).__name__}, not a tensor; only "
                "tensor inputs are supported. Make it a tensor or a constant of the model."
            )
        if value.dim() == 0 or not isinstance(value.shape[0], torch.SymInt):
            shape = tuple(value.shape)
            raise ModelFormatError(
                f"{path.name}: input {name!r} has a static batch dimension (shape {shape}); the "
                "first dimension of every input must be dynamic. Export with "
                f"dynamic_shapes={{{name!r}: {{0: torch.export.Dim(\"batch\")}}}} (one entry "
                "per input) and save the program again."
            )


def _check_outputs(path: Path, program: ExportedProgram) -> None:
    user_outputs = set(program.graph_signature.user_outputs)
    output = next(n for n in program.graph.nodes if n.op == "output")
    values = [n for n in output.args[0] if isinstance(n, torch.fx.Node) and n.name in user_outputs]
    for index, node in enumerate(values):
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) and value.dim() == 0:
            raise UnsupportedModelError(
                f"{path.name}: output {index} is a scalar (shape ()), such as a loss; compression "
                "compares the compressed model's outputs with the original's sample by sample, "
                "so every output needs the batch as its first dimension. Export the model "
                "without the loss (return the logits or embeddings) and save the program again."
            )


def _check_dtypes(path: Path, program: ExportedProgram) -> None:
    tensors = {**dict(program.named_parameters()), **dict(program.named_buffers()),
               **{name: t for name, t in program.constants.items()
                  if isinstance(t, torch.Tensor)}}
    inputs = {n.name: n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"
              and n.name in set(program.graph_signature.user_inputs)}
    found = [name for name, t in {**tensors, **inputs}.items()
             if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16]
    if found:
        shown = ", ".join(repr(n) for n in found[:3]) + (", ..." if len(found) > 3 else "")
        raise UnsupportedModelError(
            f"{path.name}: the program holds bfloat16 tensors ({shown}); onnxruntime's CPU "
            "provider, which verifies every artifact, cannot run bfloat16 matrix products. "
            "Convert the model and its example inputs to float32 (model.float()) or float16 "
            "(model.half()) before exporting, and save the program again."
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _innermost(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _reason(exc: BaseException) -> str:
    """Return the innermost cause of a deserialization failure, in one line."""
    cause = _innermost(exc)
    return f"{type(cause).__name__}: {_first_line(cause)}"


def _unpickling_reason(exc: BaseException) -> str:
    """Return the line of a restricted-unpickler error that names the refused object."""
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue")
    paragraphs = [p.strip() for p in str(exc).split("\n\n") if p.strip()]
    found = [p for p in paragraphs if not p.startswith(boilerplate)]
    reason = found[0] if found else _first_line(exc)
    return reason.removeprefix("WeightsUnpickler error:").strip().splitlines()[0][:300]
