"""Check the README: its commands run as written and its references are current.

Each fenced block carries a note: `<!-- test: tour -->` blocks run here verbatim, in order, in
an empty folder (python blocks are saved under the file name of their first line);
`<!-- covered-by: tests/x.py::test_y ... -->` blocks name the test that checks what they rely on.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

from tests.support.command_service import running_service, serve_available, service_env
from tests.support.network import free_port

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
GENERATOR = REPO / "scripts" / "gen_config_reference.py"
_BLOCK = re.compile(r"(?:<!-- (?P<note>[^\n]*?) -->\n)?```(?P<lang>\w*)\n(?P<code>.*?)```", re.S)


@dataclass(frozen=True)
class Block:
    """One fenced code block and the note above it."""

    note: str
    lang: str
    code: str


def blocks(path: Path = README) -> list[Block]:
    """Return the fenced blocks of `path`, in order."""
    return [Block(m["note"] or "", m["lang"], m["code"]) for m in _BLOCK.finditer(path.read_text())]


def test_every_block_says_which_test_runs_it() -> None:
    found = blocks()
    assert found, "no code blocks found"
    for block in found:
        note = block.note
        assert note.startswith(("test: tour", "covered-by: tests/", "covered-by: .ci/run")), (
            f"no note on:\n{block.code}")
        if note.startswith("covered-by: .ci/run"):
            ci = (REPO / ".ci" / "run").read_text()
            for command in block.code.splitlines():
                assert command.split("#")[0].strip() in ci, f"{command}: not run by .ci/run"
        elif note.startswith("covered-by: "):
            test_file, _, test_name = note.removeprefix("covered-by: ").split()[0].partition("::")
            source = (REPO / test_file).read_text()
            assert f"def {test_name}(" in source, f"{note}: no such test"


def run_block(block: Block, workdir: Path, env: dict[str, str], port: int) -> str:
    """Run one tour block in `workdir` (shell variables carry over); return its output."""
    code = block.code.replace("8000", str(port))
    if block.lang == "python":
        name = code.splitlines()[0].removeprefix("# ").strip()
        (workdir / name).write_text(code)
        return ""
    assigned = sorted(set(re.findall(r"^([A-Z_]+)=", code, re.M)))
    saving = "".join(f"declare -p {name} >> .tour-vars\n" for name in assigned)
    script = f"[ -f .tour-vars ] && source .tour-vars\n{code}\n{saving}"
    result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    expect_failure = "expect-failure" in block.note
    assert "Traceback" not in output, f"{code}\n{output}"
    assert (result.returncode != 0) == expect_failure, f"exit {result.returncode}:\n{code}\n{output}"
    return output


@pytest.mark.slow
def test_tour_runs_as_written(tmp_path: Path) -> None:
    assert serve_available(), "`compressor serve --help` fails: the service's command is broken"
    port = free_port()
    env = service_env(tmp_path / "compressor-data",
                      COMPRESSOR_SERVER=f"http://127.0.0.1:{port}")
    env.pop("COMPRESSOR_DATA_DIR")  # the tour uses the default, ./compressor-data
    tour = [b for b in blocks() if b.note.startswith("test: tour")]
    outputs: dict[str, str] = {}
    serving = None
    try:
        for block in tour:
            if block.code.startswith("compressor serve"):
                command = shlex.split(block.code.replace("8000", str(port)), comments=True)
                serving = running_service(command, env, port, tmp_path)
                serving.__enter__()
                continue
            outputs[block.code] = run_block(block, tmp_path, env, port)
    finally:
        if serving is not None:
            serving.__exit__(None, None, None)
    assert serving is not None, "the tour never starts the service"
    everything = "\n".join(outputs.values())
    assert "(4, 10)" in everything and "['x']" in everything  # run_onnx.py
    etag = re.search(r'(?im)^etag: "([0-9a-f]{64})"', everything)
    assert etag and f"{etag[1]}  model.onnx" in everything  # the ETag is the sha256
    assert (tmp_path / "model-small.onnx").stat().st_size > 0
    assert "['last_hidden_state'] True" in everything  # load_back.py: from_pretrained == ONNX
    refused = next(out for code, out in outputs.items() if "pickled.pt2" in code)
    assert "torch.export" in refused, refused


def load_generator() -> ModuleType:
    """Import scripts/gen_config_reference.py as a module."""
    spec = importlib.util.spec_from_file_location("gen_config_reference", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    return load_generator()


def test_config_and_settings_references_are_current(
    generator: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    assert generator.main(["--check", str(README)]) == 0, capsys.readouterr().err


def test_reference_check_fails_on_a_stale_file_and_a_rewrite_fixes_it(
    generator: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = tmp_path / "README.md"
    stale.write_text("intro\n<!-- config-reference:start -->\nold table\n"
                     "<!-- config-reference:end -->\noutro\n")
    assert generator.main(["--check", str(stale)]) == 1
    assert "stale references" in capsys.readouterr().err
    assert "old table" in stale.read_text()  # --check changes nothing
    assert generator.main([str(stale)]) == 0
    text = stale.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old table" not in text
    assert "| `finetune.steps` | integer | `300` | ≥ 0, ≤ 1000000 |" in text
    assert generator.main(["--check", str(stale)]) == 0


def test_every_config_field_and_setting_is_in_the_references(generator: ModuleType) -> None:
    from api.settings import Settings
    from compressor.config import CompressionConfig

    config = generator.render_config_reference()
    for name, info in CompressionConfig.model_fields.items():
        assert f"| `{name}` |" in config, name
        for inner in getattr(info.annotation, "model_fields", {}):
            assert f"| `{name}.{inner}` |" in config, f"{name}.{inner}"
    settings = generator.render_settings_reference()
    for name in Settings.model_fields:
        assert f"| `COMPRESSOR_{name.upper()}` |" in settings, name


def test_a_file_without_markers_is_an_error_that_says_what_to_add(
    generator: ModuleType, tmp_path: Path
) -> None:
    plain = tmp_path / "README.md"
    plain.write_text("no markers here\n")
    with pytest.raises(SystemExit, match="<!-- config-reference:start -->"):
        generator.main([str(plain)])


def test_the_script_runs_from_the_command_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(GENERATOR), "--check", str(README)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_the_readme_lists_every_error_code_the_product_emits() -> None:
    from compressor.vocabulary import ErrorCode

    codes = {value for name, value in vars(ErrorCode).items() if name.isupper()}
    codes.discard(ErrorCode.COMPRESSOR_ERROR)  # the base class's: every error raised is a subclass
    missing = sorted(code for code in codes if f"`{code}`" not in README.read_text())
    assert not missing, f"README.md's error codes lack {missing}"


def test_the_demo_says_how_to_run_the_compressor_it_installed() -> None:
    # The demo installs into .venv/, which is not on the PATH; its last words say so.
    said = subprocess.run(
        ["bash", "-c", "sed -n '/^cat <<.EOF.$/,/^EOF$/p' scripts/demo.sh | bash"],
        capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert ".venv/bin/compressor" in said and "source .venv/bin/activate" in said
