"""`compressor compress`: artifacts, a summary, and clear non-zero exits on bad input."""

import json

import pytest
from click.testing import CliRunner
from tiny_models import make_pt2

from compressor.cli import main


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    return make_pt2("mlp", tmp_path_factory.mktemp("cli") / "model.pt2")


@pytest.mark.slow
def test_compress_command_writes_the_artifacts_and_a_summary(program, tmp_path):
    config = tmp_path / "plan.json"
    config.write_text(json.dumps({"finetune": {"steps": 3}}))
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
def test_the_summary_works_without_the_baseline_and_shows_the_int8_fidelity(program, tmp_path):
    result = CliRunner().invoke(main, [
        "compress", str(program), "--out", str(tmp_path / "out"), "--set", "finetune.steps=2",
        "--set", "export.latency_seconds=0", "--set", "export.quantize=int8"])
    assert result.exit_code == 0, result.output
    assert "int8 file" in result.output


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
