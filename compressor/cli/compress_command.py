"""`compressor compress`: run one job on this machine, no server."""

from __future__ import annotations

import sys
import tempfile
import traceback
from pathlib import Path
from typing import NoReturn

import click

from compressor.cli.job_config import config_options, job_config
from compressor.vocabulary import JOB_LOG_ARTIFACT


def _summary_table(report: dict):
    from rich.table import Table

    table = Table(title="compression summary", show_header=True)
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    params, flops = report["parameters"], report["flops"]
    table.add_row("targeted weights", f"{params['targeted_weights_before']:,}",
                  f"{params['targeted_weights_after']:,}")
    table.add_row("model parameters (artifact)", f"{params['before']:,}", f"{params['after']:,}")
    table.add_row("FLOPs / sample (artifact)", f"{flops['before']:,}", f"{flops['after']:,}")
    table.add_row("FLOPs / sample (factorized form)", f"{flops['before']:,}",
                  f"{flops['factorized_form']:,}")
    original_bytes = report["onnx_bytes"]["original"]  # None when the baseline was skipped
    table.add_row("ONNX bytes", "—" if original_bytes is None else f"{original_bytes:,}",
                  f"{report['onnx_bytes']['artifact']:,}")
    for key in report["latency"]["original"]:
        table.add_row(f"onnxruntime {key.replace('_', ' ')}",
                      f"{report['latency']['original'][key]:.3f}",
                      f"{report['latency']['compressed'][key]:.3f}")
    artifact = report["fidelity"].get("artifact", {})
    for name, fid in report["fidelity"]["final"].items():
        init = report["fidelity"]["initialization"][name]
        if "perplexity" in fid:  # a language model's: what its users judge it by
            shipped = artifact.get(name, fid)
            table.add_row(f"{name} held-out perplexity", f"{fid['original_perplexity']:.4g}",
                          f"{shipped['perplexity']:.4g}")
        table.add_row(f"{name} vs original (init → tuned)", _fidelity_cells(init),
                      _fidelity_cells(fid))
    quantized = (report.get("config") or {}).get("export", {}).get("quantize")
    for name, fid in artifact.items():
        table.add_row(f"{name}, {quantized or 'ONNX'} file vs original", "", _fidelity_cells(fid))
    return table


def _fidelity_cells(fid: dict) -> str:
    cells = [f"cos {fid['cosine']:.4f}", f"relL2 {fid['relative_l2']:.4f}"]
    if "top1_agreement" in fid:
        cells.append(f"top1 {fid['top1_agreement']:.3f}")
    if "perplexity" in fid:
        cells += [f"ppl {fid['perplexity']:.4g}", f"KL {fid['kl_divergence']:.3g}"]
    return " ".join(cells)


@click.command("compress")
@click.argument("model", type=click.Path(path_type=Path))
@config_options
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path),
              help=".safetensors / .npz inputs named after the program's inputs; for a Hugging "
              "Face checkpoint also .txt (a sample a line) or .jsonl (a \"text\" field a line)")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="folder for model.onnx, report.json and job.log (and model-hf.zip for a "
              "Hugging Face checkpoint)")
def compress_cmd(model: Path, config_source: str | None, settings: tuple[str, ...],
                 data: Path | None, out_dir: Path) -> None:
    """Compress MODEL (a torch.export .pt2, or a Hugging Face model folder or its .zip /
    .tar.gz) and write a verified ONNX file to --out."""
    from rich.console import Console

    console = Console(stderr=True)
    if not model.exists():
        raise click.BadParameter(f"{model} does not exist", param_hint="model")
    if data is not None and not data.is_file():
        raise click.BadParameter(f"{data} does not exist or is not a file", param_hint="data")
    # A typo in the config is reported before the pipeline (onnx, the exporters) is imported.
    config = _checked_config(console, job_config(config_source, settings) or {})

    from compressor import CompressorError, InternalError, compress
    from compressor.cli.progress_display import StageProgress

    try:
        with StageProgress(console) as display:
            result = compress(model, config, out_dir=out_dir, data=data, progress=display.update)
    except CompressorError as exc:
        _fail(console, exc.code, exc.message, out_dir / JOB_LOG_ARTIFACT)
    except Exception as exc:  # noqa: BLE001 - outside the job itself, e.g. --out is unwritable
        error_id = InternalError.new_id()
        log_path = _write_traceback(exc, error_id)
        error = InternalError.wrapping(exc, log_name=str(log_path), error_id=error_id)
        _fail(console, error.code, error.message, log_path)
    console.print(_headline(result.report), soft_wrap=True)
    console.print(_summary_table(result.report))
    console.print(f"wrote {result.model_path} and {result.report_path}", soft_wrap=True)


def _checked_config(console, config: dict):
    """Return `config` as a `CompressionConfig`; print what is wrong and exit 1 if it is not."""
    from compressor.config import CompressionConfig
    from compressor.errors import ConfigError

    try:
        return CompressionConfig.parse(config)
    except ConfigError as exc:
        _fail(console, exc.code, exc.message, None)


def _headline(report: dict) -> str:
    """Return the outcome's headline, then each warning, what the time budget cut and which
    candidates the machine lacked the memory to score, as rich markup."""
    from rich.markup import escape

    lines = [f"[bold]{escape(report['outcome']['headline'])}[/]"]
    lines += [f"[yellow]warning[/]: {escape(w)}" for w in report.get("warnings", [])]
    budget = report.get("budget") or {}
    if budget.get("cut"):
        lines.append(f"[yellow]cut to fit max_minutes {budget['max_minutes']:g}[/]: "
                     + escape("; ".join(budget["cut"])))
    not_scored = (report.get("target") or {}).get("not_scored")
    if not_scored:
        lines.append("[yellow]not scored for lack of memory[/]: " + escape("; ".join(not_scored)))
    return "\n".join(lines)


def _fail(console, code: str, message: str, log_path: Path | None) -> NoReturn:
    """Print the error's code and message and where the details are (if anywhere); exit 1.

    Not wrapped at the terminal's width: the message may hold a recipe (an export call) to copy.
    """
    from rich.markup import escape

    console.print(f"[bold red]error[/] ({code}): {escape(message)}", soft_wrap=True)
    if log_path is not None:
        console.print(f"details: {escape(str(log_path))}", soft_wrap=True)
    sys.exit(1)


def _write_traceback(exc: BaseException, error_id: str) -> Path:
    """Write the traceback of `exc` to a file named after `error_id`; return its path."""
    path = Path(tempfile.gettempdir()) / f"compressor-error-{error_id}.log"
    path.write_text("".join(traceback.format_exception(exc)))
    return path


COMMANDS = [compress_cmd]
