"""What int8 costs a language model, by how it is quantized: the original and a compressed job.

    python -m benchmarks.bench_lm --ratios 0.8           # first: the job whose artifact is read
    python -m benchmarks.bench_lm_int8 [--model gemma3-270m] [--ratio 0.8] [--steps 0]

onnxruntime's dynamic int8 has three knobs that matter here: the weights' type (int8 or uint8),
per-tensor or per-channel weight scales, and `reduce_range` (7-bit weights). On an x86 CPU
without VNNI (AVX2 only) its uint8 × int8 kernel sums pairs of products in 16 bits, which
saturate with full-range int8 weights; `reduce_range` and uint8 weights are the two ways around
it that onnxruntime documents. This scores each way on the original and on the job's factorized
artifact (`benchmarks.bench_lm`'s job folder for `--ratio` / `--steps`), on bench_lm's held-out
windows: perplexity, its ratio to the original's, next-token top-1 agreement with the original,
size and onnxruntime latency at batch 8 × 128. Results go to `results/lm-int8.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
from pathlib import Path

from benchmarks import bench_lm
from compressor.export.onnx import logs_quiet
from compressor.export.quantize import quantize_int8

# name: quantize_dynamic's arguments (None: the product's `quantize_int8`)
VARIANTS = {
    "onnxruntime defaults (int8 weights per tensor, 8 bits)": {},
    "int8 weights per channel, 8 bits": {"per_channel": True},
    "int8 weights per tensor, 7 bits": {"reduce_range": True},
    "the product's int8 (per channel, 7 bits)": None,
    "uint8 weights per channel, 8 bits": {"per_channel": True, "weight_type": "QUInt8"},
}


def quantized(source: Path, target: Path, arguments: dict | None) -> Path:
    """Write `source` quantized the way `arguments` say to `target`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if arguments is None:
        quantize_int8(source, target)
        return target
    arguments = {"weight_type": "QInt8", **arguments}
    arguments["weight_type"] = QuantType[arguments["weight_type"]]
    with logs_quiet(), contextlib.redirect_stdout(io.StringIO()):
        quantize_dynamic(source, target, **arguments)
    return target


def run(model: str, ratio: float, steps: int, train_count: int, eval_count: int) -> dict:
    make_folder, work, _ = bench_lm.MODELS[model]
    folder = make_folder()
    job = bench_lm.JobSettings(steps).folder(work, ratio)
    original = work / "original.onnx"
    for needed in (original, job / "model.onnx"):
        if not needed.is_file():
            raise SystemExit(f"{needed} is missing: run `python -m benchmarks.bench_lm --model "
                             f"{model} --ratios {ratio} --steps {steps}` first")
    texts = bench_lm.paragraphs()
    windows = bench_lm.eval_windows(folder, work, texts[train_count:train_count + eval_count])
    results: dict = {"model": model, "ratio": ratio, "steps": steps,
                     "windows": len(windows["input_ids"]),
                     "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                     "load_before": os.getloadavg(), "candidates": {}}
    figures, reference = bench_lm.score(original, windows, None)
    rows = {"original": figures}
    figures, _ = bench_lm.score(job / "model.onnx", windows, reference)
    rows[f"ratio {ratio}"] = figures
    scratch = work / "int8-variants"
    scratch.mkdir(exist_ok=True)
    for source_label, source in (("original", original), (f"ratio {ratio}", job / "model.onnx")):
        for name, arguments in VARIANTS.items():
            path = quantized(source, scratch / "model.onnx", arguments)
            rows[f"{source_label} + {name}"], _ = bench_lm.score(path, windows, reference)
            print(source_label, name, json.dumps(rows[f"{source_label} + {name}"]), flush=True)
            path.unlink()
    base = rows["original"]["perplexity"]
    for figures in rows.values():
        figures["perplexity_ratio"] = figures["perplexity"] / base
    results["candidates"] = rows
    results["load_after"] = os.getloadavg()
    (bench_lm.RESULTS / "lm-int8.json").write_text(json.dumps(results, indent=1))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(bench_lm.MODELS), default="gemma3-270m")
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--train", type=int, default=120)
    parser.add_argument("--eval", type=int, default=40)
    args = parser.parse_args()
    run(args.model, args.ratio, args.steps, args.train, args.eval)


if __name__ == "__main__":
    main()
