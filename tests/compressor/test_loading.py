"""load_program: real programs round-trip; every unsafe or malformed upload is refused."""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import shlex
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from compressor.errors import ModelFormatError, UnsafeModelError
from compressor.load import program as loading
from compressor.load.program import load_program
from tests.support.tiny_models import (
    TinyConvNet,
    TinyMLP,
    TinyTextEncoder,
    example_inputs,
    export_pt2,
)

MODELS = {"mlp": TinyMLP, "conv": TinyConvNet, "text": TinyTextEncoder}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """Each tiny model, eager and exported to a .pt2, once per module."""
    folder = tmp_path_factory.mktemp("pt2")
    out = {}
    for kind, cls in MODELS.items():
        torch.manual_seed(0)
        model = cls().eval()
        out[kind] = (export_pt2(model, example_inputs(model), folder / f"{kind}.pt2"), model)
    return out


@pytest.fixture
def mlp_pt2(exported) -> Path:
    return exported["mlp"][0]


# -- helpers that build hostile files from a real archive -----------------------------------


class ShellPayload:
    """Unpickling runs `touch marker` through os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


class ExecPayload:
    """Unpickling creates the marker file through exec."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def torch_saved(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def rewrite(src: Path, dst: Path, edit: Callable[[dict[str, bytes]], None]) -> Path:
    """Copy the .pt2 `src` to `dst`, letting `edit` change its members (names without root)."""
    with zipfile.ZipFile(src) as archive:
        root = archive.namelist()[0].split("/")[0]
        members = {n[len(root) + 1 :]: archive.read(n) for n in archive.namelist()}
    edit(members)
    with zipfile.ZipFile(dst, "w") as archive:
        for name, data in members.items():
            archive.writestr(f"{root}/{name}", data)
    return dst


def evil_sample_inputs(members: dict[str, bytes], marker: Path) -> None:
    members["data/sample_inputs/model.pt"] = torch_saved(((ShellPayload(marker),), {}))


def evil_pickled_weight(members: dict[str, bytes], marker: Path) -> None:
    config_name = "data/weights/model_weights_config.json"
    config = json.loads(members[config_name])
    entry = config["config"]["fc1.weight"]
    entry["use_pickle"] = True
    members[config_name] = json.dumps(config).encode()
    members[f"data/weights/{entry['path_name']}"] = torch_saved(ExecPayload(marker))


def evil_pickled_constant(members: dict[str, bytes], marker: Path) -> None:
    config = {"path_name": "tensor_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
    members["data/constants/model_constants_config.json"] = json.dumps(
        {"config": {"scale": config}}
    ).encode()
    members["data/constants/tensor_0"] = torch_saved(ShellPayload(marker))


def evil_opaque_constant(members: dict[str, bytes], marker: Path) -> None:
    config = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
              "tensor_meta": None}
    members["data/constants/model_constants_config.json"] = json.dumps(
        {"config": {"obj": config}}
    ).encode()
    members["data/constants/opaque_obj_0"] = pickle.dumps(ShellPayload(marker))


def evil_legacy_weights(members: dict[str, bytes], marker: Path) -> None:
    members["data/weights/model.pt"] = torch_saved(ExecPayload(marker))


HOSTILE_ARCHIVES = {
    "sample_inputs": (evil_sample_inputs, "data/sample_inputs/model.pt"),
    "pickled_weight": (evil_pickled_weight, "data/weights/weight_0"),
    "pickled_constant": (evil_pickled_constant, "data/constants/tensor_0"),
    "opaque_constant": (evil_opaque_constant, "opaque_obj_0"),
    "legacy_weights": (evil_legacy_weights, "legacy pickled file"),
}


@pytest.fixture(params=sorted(HOSTILE_ARCHIVES))
def hostile(request, mlp_pt2, tmp_path) -> tuple[Path, Path, str]:
    """A hostile archive, the marker file its payload would create, and the refusal's hint."""
    edit, hint = HOSTILE_ARCHIVES[request.param]
    marker = tmp_path / "pwned"
    path = rewrite(mlp_pt2, tmp_path / "model.pt2", lambda m: edit(m, marker))
    return path, marker, hint


# -- real programs ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_tiny_models_round_trip(exported, kind):
    path, model = exported[kind]
    program = load_program(path)
    inputs = example_inputs(model, batch=3, seed=1)  # another batch size: the batch is dynamic
    got = program.module()(**inputs)
    want = model(**inputs)
    for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want),
                    strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert list(program.graph_signature.user_inputs) == list(example_inputs(model))


# -- hostile archives -------------------------------------------------------------------------


def test_hostile_payloads_are_live_without_the_guard(hostile):
    """Plain torch.export.load runs each payload, so the refusals below are meaningful."""
    path, marker, _ = hostile
    try:
        torch.export.load(path)
    except Exception:  # noqa: BLE001 - it may fail after running the payload
        pass
    assert marker.exists()


def test_hostile_archives_are_refused_without_running_code(hostile):
    path, marker, hint = hostile
    with pytest.raises(UnsafeModelError) as caught:
        load_program(path)
    assert not marker.exists()
    assert "model.pt2" in caught.value.message
    assert hint in caught.value.message
    assert "code execution" in caught.value.message


def test_deserializer_is_locked_down_even_without_the_member_checks(hostile):
    """Step 3 alone (torch.load forced to weights_only, pickle refusing) stops every payload."""
    path, marker, _ = hostile
    originals = (torch.load, torch._C._pickle_load_obj)
    with pytest.raises(UnsafeModelError, match="code execution"):
        loading._deserialize(path)
    assert not marker.exists()
    assert (torch.load, torch._C._pickle_load_obj) == originals  # the patches are undone


def test_restricted_unpickler_error_names_the_refused_global(mlp_pt2, tmp_path):
    marker = tmp_path / "pwned"
    path = rewrite(mlp_pt2, tmp_path / "model.pt2", lambda m: evil_sample_inputs(m, marker))
    with pytest.raises(UnsafeModelError, match=r"GLOBAL posix\.system"):
        load_program(path)


def test_custom_object_constant_is_refused(mlp_pt2, tmp_path):
    def edit(members):
        config = {"path_name": "custom_obj_0", "is_param": False, "use_pickle": True,
                  "tensor_meta": None}
        members["data/constants/model_constants_config.json"] = json.dumps(
            {"config": {"obj": config}}
        ).encode()
        members["data/constants/custom_obj_0"] = b"\x00" * 16

    with pytest.raises(UnsafeModelError, match="torchbind"):
        load_program(rewrite(mlp_pt2, tmp_path / "model.pt2", edit))


def test_aotinductor_native_code_is_refused(mlp_pt2, tmp_path):
    def edit(members):
        members["data/aotinductor/model/model.so"] = b"\x7fELF" + b"\x00" * 60

    with pytest.raises(UnsafeModelError, match="AOTInductor"):
        load_program(rewrite(mlp_pt2, tmp_path / "model.pt2", edit))


def test_graph_calling_a_python_function_is_refused(mlp_pt2):
    program = load_program(mlp_pt2)
    graph = program.graph_module.graph
    first = next(n for n in graph.nodes if n.op == "call_function")
    with graph.inserting_before(first):
        graph.call_function(os.system, ("true",))
    with pytest.raises(UnsafeModelError, match="system"):
        loading._check_operators(mlp_pt2, program)


def test_graph_node_with_a_python_target_in_the_file_is_refused(mlp_pt2, tmp_path):
    marker = tmp_path / "pwned"

    def edit(members):
        program = json.loads(members["models/model.json"])
        program["graph_module"]["graph"]["nodes"].insert(0, {
            "target": "torch.os.system", "name": "evil", "metadata": {},
            "inputs": [{"name": "cmd", "arg": {"as_string": f"touch {marker}"}, "kind": 1}],
            "outputs": [{"as_none": True}], "is_hop_single_tensor_return": None,
        })
        members["models/model.json"] = json.dumps(program).encode()

    with pytest.raises(ModelFormatError, match="system"):
        load_program(rewrite(mlp_pt2, tmp_path / "model.pt2", edit))
    assert not marker.exists()


# -- files that are not a .pt2 program -------------------------------------------------------


def _truncated(pt2: Path) -> bytes:
    data = pt2.read_bytes()
    return data[: len(data) // 2]


NOT_ZIP_CASES = [
    ("empty", lambda pt2: b"", ModelFormatError, "is empty"),
    ("truncated", _truncated, ModelFormatError, "truncated or corrupt"),
    ("random", lambda pt2: b"\x00\x93" + random.Random(0).randbytes(4094), ModelFormatError,
     "not a zip archive"),
    ("text", lambda pt2: b"my model weights\nlayer1: 0.1 0.2\n", ModelFormatError,
     "text file (starts with 'my model weights')"),
    ("raw_pickle", lambda pt2: pickle.dumps({"w": [1.0, 2.0]}), UnsafeModelError,
     "raw Python pickle (protocol"),
]


@pytest.mark.parametrize(("content", "error", "message"),
                         [case[1:] for case in NOT_ZIP_CASES], ids=[c[0] for c in NOT_ZIP_CASES])
def test_non_archives_are_refused(mlp_pt2, tmp_path, content, error, message):
    path = tmp_path / "upload.pt2"
    path.write_bytes(content(mlp_pt2))
    with pytest.raises(error) as caught:
        load_program(path)
    assert type(caught.value) is error
    assert "upload.pt2" in caught.value.message
    assert message in caught.value.message


def test_raw_pickle_payload_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(ShellPayload(marker)))
    with pytest.raises(UnsafeModelError, match="raw Python pickle"):
        load_program(path)
    assert not marker.exists()


def test_legacy_torch_save_is_a_raw_pickle(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(TinyMLP().state_dict(), path, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeModelError, match="raw Python pickle"):
        load_program(path)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(ModelFormatError, match="not found"):
        load_program(tmp_path / "nope.pt2")


def test_pickled_module_is_refused_with_export_instructions(tmp_path):
    marker = tmp_path / "pwned"
    model = TinyMLP()
    model.payload = ShellPayload(marker)  # would run on unpickling
    path = tmp_path / "model.pt"
    torch.save(model, path)
    with pytest.raises(UnsafeModelError) as caught:
        load_program(path)
    message = caught.value.message
    assert "pickled Python object" in message and "torch.save(model)" in message
    assert "torch.export.export(" in message and "torch.export.save(" in message
    assert "torch.export.Dim('batch')" in message
    assert not marker.exists()


@pytest.mark.parametrize("checkpoint", [False, True], ids=["state_dict", "checkpoint"])
def test_state_dict_is_refused_with_export_instructions(tmp_path, checkpoint):
    weights = TinyMLP().state_dict()
    path = tmp_path / "model.pt"
    torch.save({"model": weights, "epoch": 3} if checkpoint else weights, path)
    with pytest.raises(ModelFormatError) as caught:
        load_program(path)
    assert type(caught.value) is ModelFormatError
    message = caught.value.message
    assert "bare state_dict" in message and "not the model's code" in message
    assert ("'model'" if checkpoint else "'fc1.weight'") in message
    assert "torch.export.export(" in message and "torch.export.save(" in message


def test_zip_that_is_not_a_program_is_refused(tmp_path):
    path = tmp_path / "model.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("model/readme.txt", "hello")
    with pytest.raises(ModelFormatError, match="no archive_format"):
        load_program(path)


def test_zip_with_several_top_folders_is_refused(mlp_pt2, tmp_path):
    path = tmp_path / "model.pt2"
    path.write_bytes(mlp_pt2.read_bytes())
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("other/archive_format", "pt2")
    with pytest.raises(ModelFormatError, match="one top folder"):
        load_program(path)


# -- malformed archives ----------------------------------------------------------------------


def _set(name: str, data: bytes) -> Callable[[dict[str, bytes]], None]:
    return lambda members: members.__setitem__(name, data)


def _rename_op(members: dict[str, bytes]) -> None:
    text = members["models/model.json"].decode()
    members["models/model.json"] = text.replace("aten.linear.default", "aten.not_an_op.default",
                                                1).encode()


MALFORMED = [
    ("two_models", lambda m: m.__setitem__("models/other.json", m["models/model.json"]),
     "holds 2 programs (model, other)"),
    ("no_model", lambda m: m.pop("models/model.json"), "holds 0 programs"),
    ("archive_format", _set("archive_format", b"zip"), "archive_format is 'zip'"),
    ("corrupt_json", _set("models/model.json", b"{not json"), "JSONDecodeError"),
    ("unknown_op", _rename_op, "not_an_op"),
    ("bad_payload_config", _set("data/weights/model_weights_config.json", b"[]"),
     "not a valid payload config"),
    ("path_traversal", lambda m: m.__setitem__(
        "data/weights/model_weights_config.json",
        m["data/weights/model_weights_config.json"].replace(b'"weight_0"', b'"../../x"')),
     "invalid path_name '../../x'"),
    ("missing_weights_config", lambda m: m.pop("data/weights/model_weights_config.json"),
     "lacks the member"),
    ("corrupt_sample_inputs", _set("data/sample_inputs/model.pt", b"PK\x03\x04garbage"),
     "not a readable tensor payload"),
]


@pytest.mark.parametrize(("edit", "message"), [c[1:] for c in MALFORMED],
                         ids=[c[0] for c in MALFORMED])
def test_malformed_archives_are_refused(mlp_pt2, tmp_path, edit, message):
    with pytest.raises(ModelFormatError) as caught:
        load_program(rewrite(mlp_pt2, tmp_path / "model.pt2", edit))
    assert type(caught.value) is ModelFormatError
    assert "model.pt2" in caught.value.message
    assert message in caught.value.message
    assert "Traceback" not in caught.value.message


def test_duplicate_members_are_refused(mlp_pt2, tmp_path):
    path = tmp_path / "model.pt2"
    path.write_bytes(mlp_pt2.read_bytes())
    root = mlp_pt2.stem
    with pytest.warns(UserWarning), zipfile.ZipFile(path, "a") as archive:
        archive.writestr(f"{root}/data/sample_inputs/model.pt", b"")
    with pytest.raises(ModelFormatError, match="more than once"):
        load_program(path)


def test_zip_bombs_are_refused(mlp_pt2, tmp_path, monkeypatch):
    path = tmp_path / "model.pt2"
    path.write_bytes(mlp_pt2.read_bytes())
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{mlp_pt2.stem}/extra/zeros", bytes(4 << 20))
    with pytest.raises(ModelFormatError, match=r"compressed \d+:1.*zip bomb"):
        load_program(path)
    monkeypatch.setattr(loading, "MAX_COMPRESSION_RATIO", 10**6)
    monkeypatch.setattr(loading, "MAX_UNCOMPRESSED_BYTES", 1 << 20)
    with pytest.raises(ModelFormatError, match=r"unpack to .* GiB.*zip bomb"):
        load_program(path)


def test_static_batch_is_refused(tmp_path):
    model = TinyMLP().eval()
    program = torch.export.export(model, (), kwargs=example_inputs(model))
    path = tmp_path / "static.pt2"
    torch.export.save(program, str(path))
    with pytest.raises(ModelFormatError) as caught:
        load_program(path)
    message = caught.value.message
    assert "static.pt2" in message and "input 'x'" in message and "(4, 32)" in message
    assert "dynamic_shapes={'x': {0: torch.export.Dim(\"batch\")}}" in message


def test_a_checkpoint_with_fewer_positions_than_max_length_gets_samples_it_can_take(tmp_path):
    # A tiny GPT-2 has 64 positions; the default data.max_length is 128. Sampling 128 token
    # positions would index past its position table (an internal error): samples are cut to 64.
    from compressor.config import CompressionConfig
    from compressor.load.stage import load
    from compressor.runtime.joblog import JobLog
    from compressor.runtime.progress import JobControl
    from tests.support.tiny_checkpoints import save_checkpoint

    folder = save_checkpoint("gpt2", tmp_path / "gpt2")
    config = CompressionConfig.parse({"data": {"synthetic_samples": 16}})
    assert config.data.max_length == 128
    log = JobLog(tmp_path / "job.log")
    loaded = load(folder, None, config, tmp_path, JobControl(None, None, 600), log)
    log.close()
    assert loaded.held_out.take(torch.arange(1))["input_ids"].shape[1] == 64
    assert "more than the model's 64 positions" in (tmp_path / "job.log").read_text()
