"""Target mode on real pretrained models: what the product hands back when told what to keep.

    pip install -e '.[bench]'
    python -m benchmarks.bench_target [--models minilm,efficientnet] [--steps 100]

Each model (see `benchmarks/real_models.py`) is compressed with the default config, only
`finetune.steps` set: target mode with the default floors (cosine ≥ 0.99 for MiniLM's
embeddings, top-1 agreement ≥ 0.99 for EfficientNet's logits). The job measures, on its own held-out split, the
artifact, the original and onnxruntime int8 of the original (the baseline a user would pick
instead): sizes, fidelity and latency come from one run, on the same inputs. The results go to
`benchmarks/results/target.json` and the table in `benchmarks/README.md`.
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


def run(name: str, steps: int) -> dict:
    """Compress one real model in target mode; return its figures."""
    model = build(CACHE / "models", [name])[name]
    out = CACHE / name
    config = {"finetune": {"steps": steps}}  # no ratio: target mode, the default
    start = time.perf_counter()
    try:
        result = compressor.compress(model.program, config, data=model.data, out_dir=out)
    except CompressorError as exc:
        return {"model": name, "steps": steps, "wall_s": time.perf_counter() - start,
                "error": {"code": exc.code, "message": exc.message}}
    wall = time.perf_counter() - start
    report = result.report
    return {"model": name, "steps": steps, "wall_s": wall,
            "outcome": report["outcome"], "warnings": report["warnings"],
            "onnx_bytes": report["onnx_bytes"], "latency": report["latency"],
            "fidelity": report["fidelity"], "baseline": report.get("baseline"),
            "target": report["target"], "stage_seconds": report["stage_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,efficientnet")
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()}
    runs = [run(name, args.steps) for name in args.models.split(",")]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": machine, "runs": runs}, indent=1))
    for entry in runs:
        print(entry["model"], f"{entry['wall_s']:.0f} s",
              entry.get("outcome", {}).get("headline") or entry.get("error"))


if __name__ == "__main__":
    main()
