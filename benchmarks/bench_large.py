"""Time and memory of `compressor compress` on Llama decoders of 0.1B, 0.3B and 1.1B parameters.

    pip install -e '.[bench]'
    python -m benchmarks.bench_large [--sizes 0.1b,0.3b,1.1b] [--dtype fp32|bf16] [--form pt2|hf]
                                     [--ratio 0.7] [--set KEY=VALUE ...] [--interval 0.15]
                                     [--timeout 7200] [--label NAME] [--no-record]

For each size the model is built first if its files are missing (`benchmarks/large_models.py`,
in a separate process, into `benchmarks/.cache/large/`), then

    compressor compress <model> --config <cfg.json> --data <calibration> --out <run dir>

runs as a subprocess with the issue-11 configuration: `ratio` 0.7, `finetune.steps` 0, the 80
token-id samples of 256 tokens of `calibration.safetensors` (`data.holdout_fraction` 0.2: 64
calibration / training samples, 16 held out), `data.max_length` 256 (HF folders); `--set`
overrides any other field (e.g. `--set allocation=uniform`, `--set export.latency_seconds=0`).

While it runs, the resident set size (RSS) of its whole process tree is sampled every
`--interval` seconds (psutil). The job's `job.log` (see `compressor/runtime/joblog.py`: lines
`[   12.34s] stage planning: started` / `stage planning: 3.21s`) is read as it grows and its
clock aligned with the sampler's, so every sample falls in a stage, or in the gap between two
stages (work the pipeline does outside any stage: the teacher copy and output detection after
loading, the fidelity and per-layer errors after fine-tuning, the report). Recorded per run:
wall time, peak RSS overall and per stage, the RSS the process had when the job started
(Python, torch and the CLI imported), model bytes (parameters × element size), the ratio of the
peak to the model bytes (issue 11's target: at most 2.5 at every stage), whether the ONNX
artifact was verified (report.json `onnx_parity.passed`), and any per-stage memory figures
report.json itself carries. A failed job is recorded too, with its stage and the end of its log.

Results: a markdown table on stdout, every run merged by label into
`benchmarks/results/large_models.json` and its table rewritten in `large_models.md` (unless
`--no-record`), and the run's folder
(`benchmarks/.cache/large/runs/<label>/`: job.log, report.json, rss.csv, stderr.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from benchmarks.large_models import CACHE, DTYPES, SHAPES, model_files

RESULTS = Path(__file__).parent / "results" / "large_models.json"
RUNS = CACHE / "runs"
GIB = 1024**3
TARGET_RATIO = 2.5
_STAGE_LINE = re.compile(r"^\[\s*([0-9.]+)s\] stage (\w+): (started|[0-9.]+s)(?:,.*)?$")
_LOG_LINE = re.compile(r"^\[\s*([0-9.]+)s\] (.*)$")


@dataclass
class Sampler:
    """Sample the RSS of a process tree, and watch a job.log grow, from one thread."""

    pid: int
    log_path: Path
    interval: float
    start: float = field(default_factory=time.monotonic)
    samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds, RSS bytes)
    log_lines: list[tuple[float, str]] = field(default_factory=list)  # (seen at, line)
    min_available: int | None = None  # the machine's least available memory during the run
    _stop: threading.Event = field(default_factory=threading.Event)
    _offset: int = 0
    _partial: str = ""

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            now = time.monotonic() - self.start
            total = 0
            try:
                processes = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for process in processes:
                try:
                    total += process.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            if total:
                self.samples.append((now, total))
            available = psutil.virtual_memory().available
            self.min_available = min(available, self.min_available or available)
            self._read_log(now)
            self._stop.wait(self.interval)
        self._read_log(time.monotonic() - self.start)

    def _read_log(self, now: float) -> None:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as file:
                if os.fstat(file.fileno()).st_size < self._offset:  # a new log: start over
                    self._offset, self._partial = 0, ""
                file.seek(self._offset)
                chunk = file.read()
                self._offset = file.tell()
        except FileNotFoundError:
            return
        text = self._partial + chunk
        *lines, self._partial = text.split("\n")
        self.log_lines.extend((now, line) for line in lines)

    def stop(self) -> None:
        self._stop.set()


def job_stages(log_lines: list[tuple[float, str]], end: float
               ) -> tuple[list[tuple[str, float, float]], float | None]:
    """Return the job's segments (name, start, end) on the sampler's clock, and the offset.

    The log's clock starts when the job made its log; a line is seen at most one interval
    after it was written, so the offset is the least (seen − logged) over all lines. Segments
    cover the whole run: `startup` (interpreter, imports, config), each stage, the gaps
    between stages (`after X`), and `after <last stage>` (report, exit).
    """
    logged = [(seen, float(m.group(1)), m.group(2)) for seen, line in log_lines
              if (m := _LOG_LINE.match(line))]
    if not logged:
        return [("whole run", 0.0, end)], None
    offset = min(seen - at for seen, at, _ in logged)
    stages: list[tuple[str, float, float]] = []
    opened: dict[str, float] = {}
    for _, at, text in logged:
        m = _STAGE_LINE.match(f"[{at:8.2f}s] {text}")
        if not m:
            continue
        name, what = m.group(2), m.group(3)
        if what == "started":
            opened[name] = at + offset
        elif name in opened:
            stages.append((name, opened.pop(name), at + offset))
    for name, begin in opened.items():  # a stage the job died in
        stages.append((name, begin, end))
    stages.sort(key=lambda s: s[1])
    segments: list[tuple[str, float, float]] = []
    cursor, previous = 0.0, "startup"
    for name, begin, finish in stages:
        if begin > cursor:
            segments.append((previous if previous == "startup" else f"after {previous}",
                             cursor, begin))
        segments.append((name, begin, finish))
        cursor, previous = finish, name
    if end > cursor:
        segments.append((f"after {previous}", cursor, end))
    return segments, offset


def segment_peaks(samples: list[tuple[float, int]], segments: list[tuple[str, float, float]]
                  ) -> list[dict]:
    """Return each segment's seconds and peak RSS (the samples inside it)."""
    out = []
    for name, begin, finish in segments:
        inside = [rss for t, rss in samples if begin <= t <= finish]
        out.append({"segment": name, "seconds": round(finish - begin, 2),
                    "peak_rss_bytes": max(inside) if inside else None,
                    "samples": len(inside)})
    return out


def report_memory(report: dict) -> dict:
    """Return whatever per-stage memory figures report.json carries (keys naming rss/memory)."""
    found = {}
    for key, value in report.items():
        if any(word in key.lower() for word in ("rss", "memory", "peak")):
            found[key] = value
    return found


def run_one(size: str, dtype: str, form: str, ratio: float, settings: list[str],
            interval: float, timeout: float, label: str) -> dict:
    """Build the model if needed, run one compress job, and return its figures."""
    files = model_files(CACHE, size, dtype)
    model = files.program if form == "pt2" else files.hf_folder
    if not model.exists() or not files.data.exists():
        print(f"building {size} {dtype} {form} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "benchmarks.large_models", "--sizes", size,
                        "--dtypes", dtype, "--forms", form], check=True,
                       cwd=Path(__file__).parent.parent)
    data = files.data if form == "pt2" else files.hf_data
    run_dir = RUNS / label
    shutil.rmtree(run_dir, ignore_errors=True)
    out_dir = run_dir / "out"
    out_dir.mkdir(parents=True)
    config = {"ratio": ratio, "finetune": {"steps": 0},
              "data": {"holdout_fraction": 0.2, "max_samples": 80, "max_length": 256}}
    config_path = run_dir / "config.json"
    config_path.write_text(json.dumps(config))
    compressor = Path(sys.executable).parent / "compressor"
    command = [str(compressor), "compress", str(model), "--config", str(config_path),
               "--data", str(data), "--out", str(out_dir)]
    for setting in settings:
        command += ["--set", setting]
    model_bytes = files.weight_bytes
    file_bytes = (model.stat().st_size if model.is_file()
                  else sum(p.stat().st_size for p in model.rglob("*") if p.is_file()))
    print(f"[{label}] {' '.join(command)}", file=sys.stderr, flush=True)
    stderr_path = run_dir / "stderr.txt"
    started = time.monotonic()
    with open(stderr_path, "wb") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr,
                                   cwd=run_dir)
        sampler = Sampler(process.pid, out_dir / "job.log", interval, start=started)
        thread = threading.Thread(target=sampler.run, daemon=True)
        thread.start()
        timed_out = False
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            process.kill()
            returncode = process.wait()
        sampler.stop()
        thread.join()
    wall = time.monotonic() - started
    (run_dir / "rss.csv").write_text("seconds,rss_bytes\n" + "".join(
        f"{t:.3f},{rss}\n" for t, rss in sampler.samples))
    segments, offset = job_stages(sampler.log_lines, wall)
    peaks = segment_peaks(sampler.samples, segments)
    peak = max((rss for _, rss in sampler.samples), default=None)
    at_start = next((rss for t, rss in sampler.samples if offset is not None and t >= offset),
                    None)
    report_path = out_dir / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else None
    log_text = (out_dir / "job.log").read_text(errors="replace") if (out_dir / "job.log").exists() \
        else ""
    failure = None
    if returncode != 0 or report is None:
        failed = [line for line in log_text.splitlines() if "failed (" in line]
        failure = {"returncode": returncode, "timed_out": timed_out,
                   "log_failure": failed[-1] if failed else None,
                   "stage": next((s["segment"] for s in reversed(peaks)
                                  if not s["segment"].startswith("after")), None),
                   "log_tail": log_text.splitlines()[-40:],
                   "stderr_tail": stderr_path.read_text(errors="replace").splitlines()[-40:]}
    parity = (report or {}).get("onnx_parity") or {}
    artifact = out_dir / "model.onnx"
    onnx_files = {p.name: p.stat().st_size for p in out_dir.iterdir()
                  if p.is_file() and (p.suffix == ".onnx" or p.name.startswith("model.onnx"))
                  or p.suffix == ".data"}
    return {
        "label": label, "size": size, "dtype": dtype, "form": form,
        "parameters": files.parameters, "model_bytes": model_bytes, "file_bytes": file_bytes,
        "command": command, "config": config, "settings": settings,
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": _machine(),
        "wall_s": round(wall, 2), "returncode": returncode,
        "peak_rss_bytes": peak, "rss_at_job_start_bytes": at_start,
        "peak_over_model_bytes": round(peak / model_bytes, 3) if peak else None,
        "worst_stage_over_model_bytes": round(max(
            (s["peak_rss_bytes"] or 0) for s in peaks) / model_bytes, 3) if peaks else None,
        "min_available_bytes": sampler.min_available,
        "segments": [{**s, "peak_over_model_bytes": round(s["peak_rss_bytes"] / model_bytes, 3)
                      if s["peak_rss_bytes"] else None} for s in peaks],
        "stage_seconds": (report or {}).get("stage_seconds"),
        "report_memory": report_memory(report or {}),
        "onnx_verified": parity.get("passed") if report else False,
        "onnx_parity": parity or None,
        "onnx_files": onnx_files if artifact.exists() else {},
        "onnx_bytes": (report or {}).get("onnx_bytes"),
        "parameters_after": (report or {}).get("parameters"),
        "fidelity": (report or {}).get("fidelity", {}).get("final"),
        "failure": failure,
        "run_dir": str(run_dir),
    }


def _machine() -> str:
    """Return the machine, with how fast it multiplies matrices: the same code ran 1.8 times
    slower on one 2-core machine than on another, so times compare only beside these figures."""
    import torch

    return (f"{platform.machine()}, {_cpu_model()}, {os.cpu_count()} cores, "
            f"{psutil.virtual_memory().total / GIB:.0f} GiB, torch {torch.__version__}, matmul "
            f"{_matmul_gflops(torch.float32):.0f} GFLOP/s fp32 / "
            f"{_matmul_gflops(torch.float64):.0f} fp64")


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "unknown CPU"
    return next((line.split(":", 1)[1].strip() for line in lines
                 if line.startswith("model name")), "unknown CPU")


def _matmul_gflops(dtype, size: int = 2048, repeats: int = 5) -> float:
    """Return the speed of a square matmul of `size` (best of `repeats`), in GFLOP/s."""
    import torch

    a = torch.randn(size, size, dtype=dtype)
    a @ a  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def _gib(value: int | None) -> str:
    return "—" if value is None else f"{value / GIB:.2f}"


def table(results: list[dict]) -> str:
    """Return the runs and their per-stage figures as markdown."""
    lines = ["| run | parameters | model bytes | wall s | RSS at job start GiB | peak RSS GiB | "
             f"peak / model bytes (target ≤ {TARGET_RATIO}) | ONNX verified | result |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        result = "succeeded" if not r["failure"] else (
            f"**failed** in {r['failure']['stage']}" + (" (timeout)" if r["failure"]["timed_out"]
                                                        else ""))
        lines.append(f"| {r['label']} | {r['parameters']:,} | {_gib(r['model_bytes'])} GiB | "
                     f"{r['wall_s']:.0f} | {_gib(r['rss_at_job_start_bytes'])} | "
                     f"{_gib(r['peak_rss_bytes'])} | {r['peak_over_model_bytes']} | "
                     f"{r['onnx_verified']} | {result} |")
    lines += ["", "Per stage: seconds / peak RSS GiB (peak ÷ model bytes)", ""]
    order: list[str] = []
    for r in results:
        for s in r["segments"]:
            if s["segment"] not in order:
                order.append(s["segment"])
    lines.append("| stage | " + " | ".join(r["label"] for r in results) + " |")
    lines.append("|---|" + "---|" * len(results))
    for name in order:
        cells = []
        for r in results:
            s = next((s for s in r["segments"] if s["segment"] == name), None)
            cells.append("—" if s is None else f"{s['seconds']:.1f} s / {_gib(s['peak_rss_bytes'])}"
                         f" ({s['peak_over_model_bytes']})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    exact = [r for r in results if (r["report_memory"] or {}).get("memory")]
    if exact:
        lines += ["", "Per stage, from report.json (the kernel's exact per-stage peak, VmHWM): "
                  "seconds / peak RSS GiB (peak ÷ model bytes)", ""]
        stages = list(dict.fromkeys(name for r in exact
                                    for name in r["report_memory"]["memory"]["stage_peak_rss_bytes"]))
        lines.append("| stage | " + " | ".join(r["label"] for r in exact) + " |")
        lines.append("|---|" + "---|" * len(exact))
        for name in [*stages, "end to end"]:
            cells = []
            for r in exact:
                peaks = r["report_memory"]["memory"]["stage_peak_rss_bytes"]
                peak = max(peaks.values()) if name == "end to end" else peaks.get(name)
                seconds = r["wall_s"] if name == "end to end" else (r["stage_seconds"] or {}).get(name)
                cells.append("—" if peak is None else
                             f"{seconds:.0f} s / {_gib(peak)} ({peak / r['model_bytes']:.2f})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for r in results:
        if r["report_memory"]:
            lines.append(f"\n{r['label']}: report.json memory: {json.dumps(r['report_memory'])}")
        if r["failure"]:
            lines.append(f"\n{r['label']}: {r['failure']['log_failure']}")
    return "\n".join(lines)


def record(results: list[dict], path: Path = RESULTS) -> None:
    """Merge `results` by label into the JSON file at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(path.read_text()) if path.exists() else {}
    previous.update({r["label"]: r for r in results})
    path.write_text(json.dumps(previous, indent=1) + "\n")
    path.with_suffix(".md").write_text(
        "# `python -m benchmarks.bench_large`: every recorded run\n\n"
        + "".join(f"- {r['label']}: {r['date']}, {r['machine']}; `{' '.join(r['settings']) or 'issue-11 config'}`\n"
                  for r in previous.values())
        + "\n" + table(list(previous.values())) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.1b", help=f"comma-separated: {','.join(SHAPES)}")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--form", default="pt2", choices=["pt2", "hf"])
    parser.add_argument("--ratio", type=float, default=0.7)
    parser.add_argument("--set", dest="settings", action="append", default=[],
                        metavar="KEY=VALUE", help="extra config override, passed to --set")
    parser.add_argument("--interval", type=float, default=0.15, help="RSS sampling period (s)")
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="per job, seconds")
    parser.add_argument("--label", default=None,
                        help="run name (default size-dtype-form[-settings]); one size only")
    parser.add_argument("--no-record", action="store_true",
                        help=f"do not merge into {RESULTS.relative_to(Path.cwd()) if RESULTS.is_relative_to(Path.cwd()) else RESULTS}")
    args = parser.parse_args()
    results = []
    for size in args.sizes.split(","):
        label = args.label or "-".join([size, args.dtype, args.form,
                                        *(s.replace("=", "_") for s in args.settings)])
        result = run_one(size, args.dtype, args.form, args.ratio, args.settings, args.interval,
                         args.timeout, label)
        results.append(result)
        if not args.no_record:
            record([result])
        print(table([result]), file=sys.stderr, flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
