"""The CLI and the client take a Hugging Face model folder as it is."""

from __future__ import annotations

import json
import zipfile

import pytest
from click.testing import CliRunner

from compressor.cli import main
from compressor.client import pack_folder
from tests.support.tiny_checkpoints import save_checkpoint, write_text


@pytest.mark.slow
def test_compress_takes_a_model_folder_and_a_text_file(tmp_path) -> None:
    folder = save_checkpoint("classifier", tmp_path / "model")
    result = CliRunner().invoke(main, [
        "compress", str(folder), "--data", str(write_text(tmp_path / "lines.txt")),
        "--out", str(tmp_path / "out"), "--set", "ratio=0.5",
        "--set", "finetune.steps=3",
        "--set", "export.latency_seconds=0", "--set", "data.max_length=16"])
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "model.onnx", "model-hf.zip", "report.json", "job.log"}
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["data"]["source"] == "lines.txt"
    assert report["artifacts"]["model-hf.zip"]["size"] > 0


def test_a_folder_is_packed_with_links_followed_and_hidden_files_left_out(tmp_path) -> None:
    folder = tmp_path / "model"
    (folder / "1_Pooling").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref")
    blob = tmp_path / "blob"
    blob.write_bytes(b"weights")
    (folder / "model.safetensors").symlink_to(blob)  # as in a Hub cache snapshot
    with pack_folder(folder) as packed:
        with zipfile.ZipFile(packed) as archive:
            assert sorted(archive.namelist()) == ["1_Pooling/config.json", "config.json",
                                                  "model.safetensors"]
            assert archive.read("model.safetensors") == b"weights"
    assert not packed.exists()  # the temporary zip is gone


@pytest.mark.slow
def test_a_decoders_summary_gives_its_held_out_perplexity(tmp_path) -> None:
    folder = save_checkpoint("llama", tmp_path / "model")
    result = CliRunner().invoke(main, [
        "compress", str(folder), "--data", str(write_text(tmp_path / "lines.txt")),
        "--out", str(tmp_path / "out"), "--set", "ratio=0.5",
        "--set", "finetune.steps=2",
        "--set", "export.latency_seconds=0", "--set", "data.max_length=16"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    figures = report["fidelity"]["artifact"]["logits"]
    # The table wraps its labels at 80 columns: "logits held-out" starts the row.
    row = next(line for line in result.output.splitlines() if "logits held-out" in line)
    assert f"{figures['original_perplexity']:.4g}" in row and f"{figures['perplexity']:.4g}" in row
    assert "ONNX file vs" in result.output and "ppl " in result.output


def test_the_client_summary_gives_the_artifacts_perplexity_beside_the_originals() -> None:
    from compressor.cli.client_commands import report_summary

    lm = {"kind": "logits", "cosine": 0.99, "relative_l2": 0.1, "top1_agreement": 0.9,
          "perplexity": 30.5, "original_perplexity": 27.4, "next_token_agreement": 0.8,
          "kl_divergence": 0.05, "next_tokens": 1000}
    report = {"fidelity": {"final": {"logits": lm},
                           "artifact": {"logits": {**lm, "perplexity": 31.25}}}}
    rows = dict(report_summary(report))
    assert rows["perplexity logits"] == "31.25 (original 27.4)"
    assert "next-token top-1 0.8" in rows["fidelity logits"]
    classifier = {"fidelity": {"final": {"logits": {"kind": "logits", "cosine": 0.99,
                                                    "relative_l2": 0.1, "top1_agreement": 0.9}}}}
    assert not any(label.startswith("perplexity") for label, _ in report_summary(classifier))
