"""Target mode on real pretrained models: what the product hands back when told what to keep.

    pip install -e '.[bench]'
    python -m benchmarks.bench_target [--models minilm,efficientnet] [--steps N]
                                      [--objective size|latency]

Each model (see `benchmarks/real_models.py`) is compressed with the default config (`--steps`
sets `finetune.steps`, the most a finalist trains; default: the config's own): target mode with
the default floors (cosine ≥ 0.99 for MiniLM's
embeddings, top-1 agreement ≥ 0.99 for EfficientNet's logits). The job measures, on its own held-out split, the
artifact, the original and onnxruntime int8 and int4 of the original (the baselines a user would
pick instead: `quantize_dynamic` and `MatMulNBitsQuantizer` with their defaults): sizes,
fidelity and latency come from one run, on the same inputs. The results go to
`benchmarks/results/target.json` (`target-latency.json` with `--objective latency`: the
fastest candidate instead of the smallest); the table printed at the end is the one in
`benchmarks/README.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

import compressor
from benchmarks.real_models import build
from compressor.errors import CompressorError

CACHE = Path(__file__).parent / ".cache" / "target"
RESULTS = Path(__file__).parent / "results" / "target.json"


def run(name: str, steps: int | None, objective: str = "size") -> dict:
    """Compress one real model in target mode; return its figures."""
    model = build(CACHE / "models", [name])[name]
    out = CACHE / (name if objective == "size" else f"{name}-{objective}")
    config: dict = {} if steps is None else {"finetune": {"steps": steps}}  # target mode
    if objective != "size":
        config["target"] = {"objective": objective}
    start = time.perf_counter()
    try:
        result = compressor.compress(model.program, config, data=model.data, out_dir=out)
    except CompressorError as exc:
        return {"model": name, "steps": steps, "objective": objective,
                "wall_s": time.perf_counter() - start,
                "error": {"code": exc.code, "message": exc.message}}
    wall = time.perf_counter() - start
    report = result.report
    return {"model": name, "steps": steps, "objective": objective, "wall_s": wall,
            "outcome": report["outcome"], "warnings": report["warnings"],
            "onnx_bytes": report["onnx_bytes"], "latency": report["latency"],
            "fidelity": report["fidelity"], "baseline": report.get("baseline"),
            "baseline_int4": report.get("baseline_int4"),
            "target": report["target"], "stage_seconds": report["stage_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,efficientnet")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--objective", choices=["size", "latency"], default="size")
    args = parser.parse_args()
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()}
    runs = [run(name, args.steps, args.objective) for name in args.models.split(",")]
    results = (RESULTS if args.objective == "size"
               else RESULTS.with_name(f"target-{args.objective}.json"))
    results.parent.mkdir(parents=True, exist_ok=True)
    machine["load_average_end"] = os.getloadavg()
    results.write_text(json.dumps({"machine": machine, "runs": runs}, indent=1))
    for entry in runs:
        print(entry["model"], f"{entry['wall_s']:.0f} s",
              entry.get("outcome", {}).get("headline") or entry.get("error"))
    print("\n".join(table(runs)))


def table(runs: list[dict]) -> list[str]:
    """Return the markdown table of benchmarks/README.md: per model the original, onnxruntime
    int8 and int4 of it (the baselines) and the default job's artifact."""
    lines = ["| model | artifact | ONNX size | fidelity | ORT b1 ms | ORT b32 ms | wall |",
             "|---|---|---|---|---|---|---|"]
    for entry in runs:
        name = entry["model"]
        if "error" in entry:
            lines.append(f"| {name}, default job | {entry['error']['code']} | | | | | "
                         f"{entry['wall_s']:.0f} s |")
            continue
        latency, sizes = entry["latency"], entry["onnx_bytes"]
        chosen = entry["target"]["chosen"]
        kept = ("shared values" if chosen.get("method") == "share_values"
                else f"kept {chosen['kept_fraction']:g}") + (
            f" + {chosen['quantize']}" if chosen["quantize"] else "")
        rows = [(f"{name} original", "—", sizes["original"], "reference", latency["original"],
                 ""),
                *((f"{name}, onnxruntime {quantize} of the original",
                   "not made" if (entry.get(key) or {}).get("error") else "—",
                   (entry.get(key) or {}).get("onnx_bytes"),
                   (entry.get(key) or {}).get("fidelity"), latency.get(key, {}), "")
                  for key, quantize in (("baseline", "int8"), ("baseline_int4", "int4"))),
                (f"**{name}, default job**", kept, sizes["artifact"],
                 entry["fidelity"].get("artifact", entry["fidelity"]["final"]),
                 latency["compressed"], f"{entry['wall_s']:.0f} s")]
        for label, artifact, size, fidelity, ms, wall in rows:
            lines.append(f"| {label} | {artifact} | {_megabytes(size)} | {_judged(fidelity)} | "
                         f"{_ms(ms, 'batch_1_ms')} | {_ms(ms, 'batch_32_ms')} | {wall} |")
    return lines


def _megabytes(size: int | None) -> str:
    return "—" if not size else f"{size / 1e6:.3g} MB"


def _judged(fidelity: dict | str | None) -> str:
    """Return the figure each output is judged by (as given when it is a word; — if none)."""
    if fidelity is None or isinstance(fidelity, str):
        return fidelity or "—"
    figure = {"logits": "top1_agreement", "embedding": "cosine", "regression": "relative_l2"}
    return ", ".join(f"{figure[f['kind']].replace('_', ' ')} {f[figure[f['kind']]]:.4f}"
                     for f in fidelity.values() if f.get("kind") in figure)


def _ms(latency: dict, key: str) -> str:
    return f"{latency[key]:.4g}" if key in latency else "—"


if __name__ == "__main__":
    main()
