"""A job killed halfway through fine-tuning, retried: its wall time against an uninterrupted job.

    python -m benchmarks.bench_resume [--model PATH] [--data PATH] [--steps 200]
                                      [--batch-size N] [--kill-at 0.5]

Three runs of `compressor.compress`, each in its own process: the job uninterrupted; the same
job SIGKILLed when fine-tuning reports step `kill-at × steps` (nothing of the process runs after
the kill, as when a worker dies); and its retry in the same out_dir, which resumes from what the
killed run kept. Prints (and writes to `results/resume.json`) each run's wall time, the killed +
retried job's total against the uninterrupted one (issue 26's target: at most 1.15×), whether
both made the same model.onnx (sha256), the peak disk use of the kept products (resume/, polled
every 0.1 s) and what the retry's job.log says it reused. Without `--model`, a 25M-parameter
MLP (1024 → 4096 → 4096 → 1024 → 10) is built; `--model` takes a .pt2 or a Hugging Face folder
(e.g. the decoders `benchmarks.large_models` builds).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "resume.json"


def _wide_mlp(folder: Path) -> Path:
    import torch
    from torch import nn

    from tests.support.tiny_models import export_pt2

    class Wide(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(1024, 4096), nn.Linear(4096, 4096)
            self.c, self.head = nn.Linear(4096, 1024), nn.Linear(1024, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))

    torch.manual_seed(0)
    return export_pt2(Wide(), {"x": torch.randn(2, 1024)}, folder / "wide.pt2")


def _child(model: str, config: str, out_dir: str, kill_step: int, data: str) -> None:
    """Run the job; SIGKILL this process when fine-tuning reports `kill_step` (0: never)."""
    import compressor

    def progress(event) -> None:
        if kill_step and event.stage == "finetuning" and event.message.startswith(
                f"step {kill_step}/"):
            os.kill(os.getpid(), signal.SIGKILL)

    compressor.compress(model, json.loads(config), out_dir=out_dir, data=data or None,
                        progress=progress)


class _DiskPeak:
    """Poll the size of a folder every 0.1 s; keep the largest seen."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.peak, self._stop = folder, 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.1):
            try:
                size = sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file())
            except OSError:  # a file replaced while listed
                continue
            self.peak = max(self.peak, size)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def _loadavg() -> list[float]:
    """Return the machine's 1-, 5- and 15-minute load averages (Linux), or [] elsewhere."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return []


def _run(model: Path, config: dict, out_dir: Path, data: Path | None,
         kill_step: int = 0) -> tuple[float, int]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_resume", "--child", str(model),
                           json.dumps(config), str(out_dir), str(kill_step), str(data or "")],
                          capture_output=True, text=True)
    if done.returncode not in (0, -signal.SIGKILL):
        raise SystemExit(f"the job failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.monotonic() - started, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--data", type=Path, help="the job's data file (default: sampled)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, help="finetune.batch_size (default: the "
                        "config's default)")
    parser.add_argument("--kill-at", type=float, default=0.5)
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, config, out_dir, kill_step, data = args.child
        _child(model, config, out_dir, int(kill_step), data)
        return
    from compressor.vocabulary import RESUME_FOLDER, sha256_of

    work = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    model = args.model or _wide_mlp(work)
    config = {"ratio": 0.5, "export": {"latency_seconds": 0},
              "finetune": {"steps": args.steps, "eval_every": max(1, args.steps // 8),
                           "checkpoint_every": max(1, args.steps // 4)}}
    if args.batch_size:
        config["finetune"]["batch_size"] = args.batch_size
    kill_step = max(1, round(args.kill_at * args.steps))
    plain, resumed = work / "uninterrupted", work / "resumed"
    load_start = _loadavg()
    plain_s, _ = _run(model, config, plain, args.data)
    watch = _DiskPeak(resumed / RESUME_FOLDER)
    killed_s, code = _run(model, config, resumed, args.data, kill_step)
    assert code == -signal.SIGKILL, "the job ended before it was killed: raise --steps"
    retry_s, _ = _run(model, config, resumed, args.data)
    peak = watch.stop()
    log = (resumed / "job.log").read_text()
    result = {
        "model": str(args.model or "wide MLP, 25.2M parameters"),
        "data": str(args.data or "sampled"), "steps": args.steps,
        "batch_size": config["finetune"].get("batch_size", "default"),
        "killed_at_step": kill_step, "checkpoint_every": config["finetune"]["checkpoint_every"],
        "uninterrupted_s": round(plain_s, 1), "killed_run_s": round(killed_s, 1),
        "retry_s": round(retry_s, 1),
        "killed_plus_retry_over_uninterrupted": round((killed_s + retry_s) / plain_s, 3),
        "same_model_onnx": sha256_of(plain / "model.onnx") == sha256_of(resumed / "model.onnx"),
        "kept_products_peak_bytes": peak,
        "retry_log": [line.split("] ", 1)[-1] for line in log.splitlines()
                      if "reused" in line or "resumed" in line or "discarded" in line],
        "retry_stage_seconds": json.loads((resumed / "report.json").read_text())
        ["stage_seconds"],
        "cores": os.cpu_count(),
        # 1-, 5- and 15-minute load averages before the first run and after the last: other
        # processes on the machine slow the runs unevenly
        "loadavg_start": load_start, "loadavg_end": _loadavg(),
    }
    print(json.dumps(result, indent=2))
    RESULTS.parent.mkdir(exist_ok=True)
    runs = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    RESULTS.write_text(json.dumps([*runs, result], indent=2) + "\n")


if __name__ == "__main__":
    main()
