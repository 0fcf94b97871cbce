"""`compressor compress`: artifacts, a summary, and clear non-zero exits on bad input."""

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from compressor.cli import main
from compressor.cli.compress_command import _headline
from tests.support.tiny_models import make_pt2


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    return make_pt2("mlp", tmp_path_factory.mktemp("cli") / "model.pt2")


@pytest.mark.slow
def test_compress_command_writes_the_artifacts_and_a_summary(program, tmp_path):
    config = tmp_path / "plan.json"
    config.write_text(json.dumps({"ratio": 0.5, "finetune": {"steps": 3}}))
    result = CliRunner().invoke(main, [
        "compress", str(program), "--config", str(config), "--out", str(tmp_path / "out"),
        "--set", "ratio=0.25", "--set", "export.form=factorized",
        "--set", "export.latency_seconds=0.05"])
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"model.onnx", "report.json",
                                                               "job.log"}
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["config"]["ratio"] == 0.25 and report["config"]["export"]["form"] == "factorized"
    assert report["config"]["finetune"]["steps"] == 3
    assert "compression summary" in result.output and "FLOPs" in result.output


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_the_summary_works_without_the_baseline_and_shows_the_quantized_fidelity(
        program, tmp_path, quantize):
    result = CliRunner().invoke(main, [
        "compress", str(program), "--out", str(tmp_path / "out"), "--set", "ratio=0.5",
        "--set", "finetune.steps=2", "--set", "export.form=factorized",
        "--set", "export.latency_seconds=0", "--set", f"export.quantize={quantize}"])
    assert result.exit_code == 0, result.output
    assert f"{quantize} file" in result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    # verified against the compressed model within export.quantized_tolerance
    checked = report["onnx_parity"]["quantized"]
    assert checked["quantized_tolerance"] == 0.3
    assert all(0 < error <= 0.3 for error in checked["relative_l2"].values())
    assert "baseline" not in report and "baseline_int4" not in report  # latency_seconds 0
    ops = {node.op_type for node in onnx.load(str(tmp_path / "out" / "model.onnx")).graph.node}
    assert ({"MatMulNBits"} if quantize == "int4" else {"MatMulInteger"}) <= ops


@pytest.mark.slow
def test_the_summary_says_what_the_time_budget_cut(program, tmp_path):
    # 30 s: less than what export, verification and the report are kept, so no step is taken
    result = CliRunner().invoke(main, [
        "compress", str(program), "--out", str(tmp_path / "out"), "--set", "ratio=0.5",
        "--set", "finetune.steps=3", "--set", "export.latency_seconds=0",
        "--set", "max_minutes=0.5"])
    assert result.exit_code == 0, result.output
    assert re.search(r"cut to fit max_minutes 0\.5: .*fine-tuning stopped at step 0 of 3",
                     " ".join(result.output.split()))


def test_the_summary_says_which_candidates_the_machine_lacked_the_memory_to_score():
    report = {"outcome": {"headline": "the artifact is 2.00× smaller"},
              "target": {"not_scored": ["the original with int8: needs about 5.1 GiB",
                                        "the shared-values candidate: needs about 8.0 GiB"]}}
    assert _headline(report).splitlines() == [
        "[bold]the artifact is 2.00× smaller[/]",
        "[yellow]not scored for lack of memory[/]: the original with int8: needs about 5.1 GiB; "
        "the shared-values candidate: needs about 8.0 GiB"]
    assert _headline({**report, "target": {"not_scored": []}}).splitlines() == [
        "[bold]the artifact is 2.00× smaller[/]"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--set", "ratio=2"], "ratio"),
        (["--set", "finetune.stepz=3"], "finetune.stepz: unknown field"),
        (["--set", "ratio"], "is not KEY=VALUE"),
    ],
)
def test_bad_settings_exit_non_zero_with_the_field(program, tmp_path, args, message):
    result = CliRunner().invoke(main, ["compress", str(program), "--out", str(tmp_path), *args])
    assert result.exit_code != 0 and message in result.output
    assert "Traceback" not in result.output


def test_a_missing_model_or_bad_config_file_is_refused(program, tmp_path):
    result = CliRunner().invoke(main, ["compress", str(tmp_path / "nope.pt2"), "--out",
                                       str(tmp_path)])
    assert result.exit_code == 2 and "does not exist" in result.output
    bad = tmp_path / "plan.json"
    bad.write_text("{not json")
    result = CliRunner().invoke(main, ["compress", str(program), "--config", str(bad), "--out",
                                       str(tmp_path)])
    assert result.exit_code == 2 and "not valid JSON" in result.output


def test_an_unloadable_model_exits_1_with_the_loaders_message(tmp_path):
    bad = tmp_path / "model.pt2"
    bad.write_text("hello")
    result = CliRunner().invoke(main, ["compress", str(bad), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "invalid_model" in result.output and "torch.export" in result.output


def _said(result) -> str:
    """The command's output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def _corpus_program(name: str, path):
    from tests.support.corpus_programs import CASES, save

    return save(next(case for case in CASES if case.name == name), path)


@pytest.mark.slow
def test_the_program_of_issue_13_compresses_from_the_command_line(tmp_path):
    # A Llama-style decoder exported from ids[:2, :64] with the sequence left to Dim.AUTO: its
    # program carries a guard about the slice's base tensor that no fresh batch can meet.
    model = _corpus_program("decoder exported from a slice ids[:2, :64] (issue 13)",
                            tmp_path / "decoder.pt2")
    result = CliRunner().invoke(main, [
        "compress", str(model), "--out", str(tmp_path / "out"), "--set", "ratio=0.5",
        "--set", "finetune.steps=2",
        "--set", "export.latency_seconds=0", "--set", "data.synthetic_samples=16"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.onnx").is_file()


def test_a_refusal_prints_the_code_the_message_and_where_the_log_is(tmp_path):
    model = _corpus_program("batch dimension capped at 8", tmp_path / "capped.pt2")
    result = CliRunner().invoke(main, ["compress", str(model), "--out", str(tmp_path / "out")])
    said = _said(result)
    assert result.exit_code == 1
    assert "error (guard_failed): input 'x' does not meet the guard `x.size()[0] <= 8`" in said
    assert f"details: {tmp_path / 'out' / 'job.log'}" in said
    assert "Traceback" not in result.output


def test_an_internal_error_prints_its_id_and_job_log_holds_the_traceback(program, tmp_path,
                                                                        monkeypatch):
    def broken_planner(*args, **kwargs):
        raise RuntimeError("the planner fell over")

    monkeypatch.setattr("compressor.plan.stage.allocate", broken_planner)
    result = CliRunner().invoke(main, ["compress", str(program), "--out", str(tmp_path),
                                       "--set", "ratio=0.5"])
    said = _said(result)
    assert result.exit_code == 1 and "Traceback" not in result.output
    found = re.search(r"error \(internal_error\): internal error ([0-9a-f]{8}) in stage "
                      r"planning: RuntimeError: the planner fell over", said)
    assert found, said
    log_text = (tmp_path / "job.log").read_text()
    assert f"details: {tmp_path / 'job.log'}" in said
    assert f"traceback of internal error {found.group(1)}:" in log_text
    assert "Traceback (most recent call last)" in log_text and "broken_planner" in log_text


def test_a_failure_outside_the_job_is_reported_with_a_log_not_a_traceback(program, tmp_path,
                                                                         monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr("compressor.pipeline.JobLog", broken)
    result = CliRunner().invoke(main, ["compress", str(program), "--out", str(tmp_path),
                                       "--set", "ratio=0.5"])
    said = _said(result)
    assert result.exit_code == 1 and "Traceback" not in result.output
    found = re.search(r"details: (\S+compressor-error-[0-9a-f]{8}\.log)", said)
    assert found and "internal_error" in said and "OSError: disk on fire" in said
    assert "disk on fire" in Path(found.group(1)).read_text()


def test_config_takes_inline_json_and_set_overrides_it(program, tmp_path):
    result = CliRunner().invoke(main, [
        "compress", str(program), "--out", str(tmp_path / "out"),
        "--config", '{"ratio": 2, "finetune": {"steps": 1}}', "--set", "finetune.stepz=1"])
    said = _said(result)
    assert result.exit_code == 1 and "error (invalid_config)" in said
    assert "ratio:" in said and "finetune.stepz: unknown field" in said
    assert "details:" not in said  # no job ran, so there is no job.log to look at
    result = CliRunner().invoke(main, ["compress", str(program), "--out", str(tmp_path),
                                       "--config", '["ratio"]'])
    assert result.exit_code == 2 and "not an object" in result.output


def test_a_config_typo_is_reported_before_the_pipeline_is_imported(program, tmp_path):
    script = (
        "import sys\n"
        "from compressor.cli import main\n"
        "try:\n"
        f"    main(['compress', {str(program)!r}, '--out', {str(tmp_path / 'out')!r},\n"
        "          '--set', 'finetune.stepz=3'])\n"
        "except SystemExit as exc:\n"
        "    print('exit', exc.code)\n"
        "print('loaded', sorted(m for m in ('compressor.pipeline', 'onnx', 'onnxruntime')\n"
        "                       if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert "finetune.stepz: unknown field" in done.stderr, done.stderr
    assert done.stdout.split("\n")[:2] == ["exit 1", "loaded []"], done.stdout


def test_an_error_is_not_wrapped_so_its_recipe_can_be_copied(tmp_path):
    model = tmp_path / "random.bin"
    model.write_bytes(bytes(range(256)) * 8)
    result = CliRunner().invoke(main, ["compress", str(model), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    recipe = ("program = torch.export.export(model, args, dynamic_shapes={'x': {0: "
              "torch.export.Dim('batch')}}) with one entry per input, then "
              "torch.export.save(program, 'model.pt2')")
    assert any(recipe in line for line in result.output.splitlines()), result.output
    assert "upload" not in result.output  # nothing is uploaded by `compress`


def test_a_zip_or_folder_that_is_not_a_model_says_what_would_have_worked(tmp_path):
    folder = tmp_path / "notamodel"
    folder.mkdir()
    (folder / "readme.txt").write_text("hello")
    archive = tmp_path / "notamodel.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.write(folder / "readme.txt", "notamodel/readme.txt")
    zip_said = _said(CliRunner().invoke(main, ["compress", str(archive), "--out",
                                               str(tmp_path / "out")]))
    assert "error (invalid_model): notamodel.zip is a zip archive but neither" in zip_said
    assert "A Hugging Face model folder is accepted too, as a folder or zipped" in zip_said
    assert "torch.export.save(program, 'model.pt2')" in zip_said
    folder_said = _said(CliRunner().invoke(main, ["compress", str(folder), "--out",
                                                  str(tmp_path / "out")]))
    assert "no config.json found" in folder_said and "save_pretrained" in folder_said
    assert "Not a Hugging Face model? Export the model as a program" in folder_said


@pytest.mark.slow
def test_a_runs_terminal_holds_no_library_warnings(program, tmp_path):
    compressor = Path(sys.executable).with_name("compressor")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    done = subprocess.run(
        [str(compressor), "compress", str(program), "--out", str(tmp_path / "out"),
         "--set", "ratio=0.5", "--set", "finetune.steps=2", "--set", "export.latency_seconds=0",
         "--set", "data.synthetic_samples=16"],
        capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    for noise in ("FutureWarning", "UserWarning", "Warning:", "it/s]"):
        assert noise not in done.stderr and noise not in done.stdout, done.stderr
    assert (tmp_path / "out" / "model.onnx").is_file()
