"""Fine-tuning speed and memory on the Llama decoders, with and without activation checkpointing.

    pip install -e '.[bench]'
    python -m benchmarks.bench_finetune [--size 1.1b] [--device auto|cpu|cuda] [--steps 10]
                                        [--batch-size 32] [--checkpointing off,on]
                                        [--label NAME] [--no-record]

The model (`benchmarks/large_models.py`, built first when missing) is loaded from its `.pt2`
and moved to the device with the pipeline's own `finetune.on_device`; every Linear is rewritten
as low rank at `--ratio` (θ initialized by SVD on the device, no calibration: this measures the
training step, not the initialization), then `finetune.finetune_` runs `--steps` steps on the
80 samples of 256 token ids of `calibration.safetensors` (64 train, 16 held out), exactly as a
job does, with `finetune.activation_checkpointing` set to each of `--checkpointing`.

Recorded per setting: seconds per step (the median of the steps after the first, from the
job's own progress events), the peak memory of the fine-tuning (CUDA: `max_memory_allocated`;
CPU: the process's peak RSS, VmHWM, reset before it), the activations a step keeps without
checkpointing (measured by `finetune_` on one sample, times the batch size), and the model FLOP
utilization: the FLOPs a step needs (the student's forward pass three times, for forward and
backward, plus the original's forward pass when its outputs are not cached; recomputation not
counted), per second, over the device's peak (CUDA: the GPU's dense bf16 peak, from its name;
CPU: the float32 matmul speed measured here). Results: a markdown table on stdout, merged by
label into `benchmarks/results/finetune.json` and its table in `finetune.md`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from benchmarks.bench_large import _cpu_model, _matmul_gflops
from benchmarks.large_models import CACHE, SHAPES, build
from compressor.config import CompressionConfig
from compressor.finetune.device import on_device, resolve_device
from compressor.finetune.loop import Distillation, HeldOut, finetune_
from compressor.load.data import Dataset
from compressor.plan.layers import find_layers
from compressor.plan.planning import plan_layers
from compressor.rewrite.parametrize import parametrize_
from compressor.runtime.costs import count_flops
from compressor.runtime.graph import shallow_copy
from compressor.runtime.memory import PeakMemory
from compressor.runtime.outputs import run_outputs
from compressor.runtime.progress import JobControl

RESULTS = Path(__file__).parent / "results" / "finetune.json"
GIB = 1024**3
# Dense bf16 tensor-core peaks (FLOP/s) of the GPUs this project may be lent, by name.
_GPU_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def _device_peak(device: torch.device) -> tuple[str, float]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((value for key, value in _GPU_PEAKS.items() if key in name), float("nan"))
        return f"{name}, dense bf16 peak {peak / 1e12:.0f} TFLOP/s", peak
    gflops = _matmul_gflops(torch.float32)
    return (f"{platform.machine()}, {_cpu_model()}, {torch.get_num_threads()} threads, "
            f"matmul {gflops:.0f} GFLOP/s fp32 (the peak used)"), gflops * 1e9


def run(size: str, device: torch.device, steps: int, batch_size: int, ratio: float,
        checkpointing: str) -> dict:
    """Fine-tune `size` for `steps` steps with `checkpointing`; return its figures."""
    files = build(size, ["fp32"], ["pt2"], CACHE)["fp32"]
    program = torch.export.load(str(files.program))
    config = CompressionConfig.parse({
        "method": "lowrank", "ratio": ratio, "allocation": "uniform",
        "finetune": {"steps": steps, "batch_size": batch_size, "eval_every": steps,
                     "activation_checkpointing": checkpointing, "device": device.type}})
    teacher = program.module()
    if device.type != "cpu":
        teacher, _ = on_device(teacher, teacher, device)
    del program
    student = shallow_copy(teacher)
    plan = plan_layers(*find_layers(teacher), config)
    parametrize_(student, plan, {}, config.finetune.grad_reduction)
    ids = load_file(str(files.data))["input_ids"]
    train, held_out = Dataset({"input_ids": ids}, False, "calibration").split(0.2, 0)
    batch = min(batch_size, len(train))
    sample = {"input_ids": train.take(torch.arange(batch))["input_ids"].to(device)}
    # On a whole batch: each W = f(θ) is computed once per step, not once per sample.
    student_flops, teacher_flops = count_flops(student, sample), count_flops(teacher, sample)
    times: list[float] = []
    control = JobControl(lambda event: times.append(time.perf_counter())
                         if event.stage == "finetuning" else None)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    peak = PeakMemory()
    peak.reset()
    eval_size = max(64, batch_size)
    with torch.no_grad():
        reference = [run_outputs(teacher, {k: v.to(device) for k, v in b.items()})
                     for b in held_out.batches(eval_size)]
    lesson = Distillation(teacher, ["logits"], train, HeldOut(held_out, eval_size, reference, reference))
    summary = finetune_(student, plan, lesson, config.finetune, control, device)
    peak_bytes = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                  else peak.peak_bytes())
    # A skipped fine-tuning (its memory is not free) or a single step gives no step time.
    gaps = [b - a for a, b in zip(times[:-1], times[1:], strict=True)]
    step_s = statistics.median(gaps) if gaps and summary.skipped is None else None
    # with its outputs kept, the original runs on a sample when a step first draws it
    teacher_share = (summary.teacher_samples / max(1, batch * summary.steps_run)
                     if summary.teacher_outputs_cached else 1.0)
    step_flops = 3 * student_flops + teacher_share * teacher_flops
    name, device_peak = _device_peak(device)
    return {
        "label": None, "size": size, "device": name, "steps": steps, "batch_size": batch,
        "sequence": int(ids.shape[1]), "ratio": ratio, "checkpointing": checkpointing,
        "checkpointed": summary.activation_checkpointing,
        "activation_bytes_per_step": summary.activation_bytes_per_step,
        "step_bytes": summary.step_bytes, "skipped": summary.skipped,
        "seconds_per_step": step_s, "steps_per_second": step_s and 1 / step_s,
        "peak_memory_bytes": peak_bytes,
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "RSS",
        "model_bytes": sum(t.numel() * t.element_size() for t in teacher.state_dict().values()),
        "step_tflop": step_flops / 1e12, "mfu": step_s and step_flops / step_s / device_peak,
        "held_out": [summary.initial_score, summary.best_score], "history": summary.history,
        "date": time.strftime("%Y-%m-%d"),
        "teacher_outputs_cached": summary.teacher_outputs_cached,
    }


def table(results: list[dict]) -> str:
    """Return the runs as markdown."""
    lines = ["| run | model | device | batch × tokens | checkpointing | s / step | steps / s | "
             "peak memory GiB | × model bytes | activations a step keeps without, GiB | "
             "MFU |", "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        kept = r["activation_bytes_per_step"]
        timed = r.get("seconds_per_step") is not None  # a skipped run has no step time
        step_s = (f"{r['seconds_per_step']:.2f}" if timed
                  else r.get("skipped") or "no step timed")
        per_s = f"{r['steps_per_second']:.3f}" if timed else "—"
        mfu = f"{r['mfu']:.1%}" if timed else "—"
        lines.append(
            f"| {r['label']} | {r['size']} | {r['device']} | {r['batch_size']} × {r['sequence']} "
            f"| {r['checkpointing']} ({'on' if r['checkpointed'] else 'off'}) | {step_s} | "
            f"{per_s} | "
            f"{r['peak_memory_bytes'] / GIB:.2f} ({r['peak_memory_kind']}) | "
            f"{r['peak_memory_bytes'] / r['model_bytes']:.2f} | "
            f"{'—' if kept is None else f'{kept / GIB:.2f}'} | "
            f"{mfu} |")
    return "\n".join(lines)


def record(results: list[dict], path: Path = RESULTS) -> None:
    """Merge `results` by label into the JSON file at `path` and rewrite its table."""
    previous = json.loads(path.read_text()) if path.exists() else {}
    previous.update({r["label"]: r for r in results})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(previous, indent=1) + "\n")
    path.with_suffix(".md").write_text("# `python -m benchmarks.bench_finetune`: every recorded "
                                       "run\n\n" + table(list(previous.values())) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1.1b", choices=list(SHAPES))
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--ratio", type=float, default=0.7)
    parser.add_argument("--checkpointing", default="off,on",
                        help="comma-separated finetune.activation_checkpointing settings")
    parser.add_argument("--label", default=None, help="run name prefix (default: size-device)")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--json-out", help=argparse.SUPPRESS)  # internal: one setting's result
    args = parser.parse_args()
    device = resolve_device(args.device)
    settings = args.checkpointing.split(",")
    if args.json_out:  # one setting, in this process
        result = run(args.size, device, args.steps, args.batch_size, args.ratio, settings[0])
        Path(args.json_out).write_text(json.dumps(result))
        return
    results = []
    for setting in settings:  # each in a fresh process: its peak memory is its own
        out = CACHE / f"finetune-{setting}.json"
        subprocess.run([sys.executable, "-m", "benchmarks.bench_finetune", "--size", args.size,
                        "--device", device.type, "--steps", str(args.steps),
                        "--batch-size", str(args.batch_size), "--ratio", str(args.ratio),
                        "--checkpointing", setting, "--json-out", str(out)], check=True)
        result = json.loads(out.read_text())
        result["label"] = f"{args.label or f'{args.size}-{device.type}'}-{setting}"
        results.append(result)
        print(table([result]), flush=True)
    print(table(results))
    if not args.no_record:
        record(results)


if __name__ == "__main__":
    main()
