"""Benchmark the compression methods on real data and their ONNX speed.

    python -m benchmarks.bench_compression [--quick] [--only fidelity|speed]

Fidelity: the digits CNN (scikit-learn's digits) and the docstring transformer (Python's own
docstrings) are trained here, then compressed at ratios 0.75 / 0.5 / 0.25 by every method; the
accuracy of each verified ONNX artifact is measured on the held-out labels. Speed: onnxruntime
CPU latency of the dense original against the `factorized` artifact, next to the FLOP ratio (the
limit), on the example models and on a larger transformer with random weights (speed only).
Results are printed and written into benchmarks/README.md between the bench markers.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

import compressor
from examples.build import build_digits, build_text, evaluate_onnx_accuracy

CACHE = Path(__file__).parent / ".cache"
README = Path(__file__).parent / "README.md"
RATIOS = (0.75, 0.5, 0.25)
# (label, config) pairs run at each ratio; tie_inputs has a fixed size and runs once.
VARIANTS = [
    ("lowrank, SVD init, no fine-tuning", {"method": "lowrank", "init": "svd",
                                           "finetune": {"steps": 0}}),
    ("lowrank, activation-aware, no fine-tuning", {"method": "lowrank",
                                                   "init": "activation_aware",
                                                   "finetune": {"steps": 0}}),
    ("lowrank, activation-aware + fine-tuning", {"method": "lowrank", "init": "activation_aware"}),
    ("tie_rows + fine-tuning", {"method": "tie_rows"}),
    ("share_values + fine-tuning", {"method": "share_values"}),
]
FINETUNE = {"steps": 400, "lr": 2e-3, "batch_size": 64, "eval_every": 25}


class RandomTransformer(nn.Module):
    """A 4-layer pre-norm transformer over (batch, 128, 512) hidden states, random weights."""

    def __init__(self, dim: int = 512, layers: int = 4, heads: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "norm1": nn.LayerNorm(dim), "qkv": nn.Linear(dim, 3 * dim), "out": nn.Linear(dim, dim),
            "norm2": nn.LayerNorm(dim), "up": nn.Linear(dim, 4 * dim), "down": nn.Linear(4 * dim, dim),
        }) for _ in range(layers))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        b, t, d = hidden.shape
        for block in self.blocks:
            q, k, v = block["qkv"](block["norm1"](hidden)).chunk(3, dim=-1)
            q, k, v = (x.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for x in (q, k, v))
            attn = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1) @ v
            hidden = hidden + block["out"](attn.transpose(1, 2).reshape(b, t, d))
            hidden = hidden + block["down"](torch.relu(block["up"](block["norm2"](hidden))))
        return hidden


def build_random_transformer(folder: Path) -> Path:
    """Export the random-weight transformer to folder/transformer.pt2."""
    torch.manual_seed(0)
    model = RandomTransformer().eval()
    program = torch.export.export(model, (torch.randn(2, 128, 512),),
                                  dynamic_shapes=({0: Dim("batch", min=1, max=1024)},))
    path = folder / "transformer.pt2"
    torch.export.save(program, str(path))
    return path


def run(model: Path, config: dict, data: Path | None, out: Path) -> dict:
    """Compress one model and return its report, with the wall time added."""
    start = time.perf_counter()
    result = compressor.compress(model, config, out_dir=out, data=data)
    result.report["wall_seconds"] = time.perf_counter() - start
    return result.report


def fidelity_rows(examples, quick: bool) -> tuple[list[list[str]], list[list[str]]]:
    """Return table rows: accuracy of every method × ratio on both example models, and the
    winner (best accuracy after fine-tuning) of each model × ratio."""
    rows, winners = [], []
    finetune = {**FINETUNE, "steps": 30} if quick else FINETUNE
    for artifacts in examples:
        rows.append([artifacts.name, "—", "original (dense, uncompressed)", "1.000",
                     f"{artifacts.accuracy:.4f}", "1.000", "—", "—", "—"])
        best: dict[str, tuple[float, str]] = {}
        plans = [(ratio, label, config) for ratio in RATIOS for label, config in VARIANTS]
        plans.append((None, "tie_inputs + fine-tuning", {"method": "tie_inputs"}))
        for ratio, label, variant in plans:
            config = json.loads(json.dumps(variant))
            config["finetune"] = {**finetune, **config.get("finetune", {})}
            tuned = config["finetune"]["steps"] > 0
            config["export"] = {"form": "factorized", "latency_seconds": 0.5 if tuned else 0}
            if ratio is not None:
                config["ratio"] = ratio
            with tempfile.TemporaryDirectory() as tmp:
                report = run(artifacts.program, config, artifacts.data, Path(tmp))
                accuracy = evaluate_onnx_accuracy(Path(tmp) / "model.onnx", artifacts.eval,
                                                  artifacts.labels)
            final = report["fidelity"]["final"]["output_0"]
            kept = report["plan"]["kept_fraction"]
            latency = report["latency"]["compressed"].get("batch_32_ms")
            original = report["latency"]["original"].get("batch_32_ms")
            rows.append([
                artifacts.name, "—" if ratio is None else f"{ratio}", label, f"{kept:.3f}",
                f"{accuracy:.4f}", f"{final.get('top1_agreement', 0):.3f}",
                f"{report['onnx_bytes']['artifact'] / 1024:.0f} KiB",
                "—" if not report["onnx_bytes"]["original"] else
                f"{report['onnx_bytes']['original'] / 1024:.0f} KiB",
                "—" if latency is None else f"{original:.3f} → {latency:.3f}"])
            print(" | ".join(rows[-1]), flush=True)
            if tuned and ratio is not None and accuracy > best.get(str(ratio), (-1.0, ""))[0]:
                best[str(ratio)] = (accuracy, label.split(",")[0].split(" +")[0])
        winners += [[artifacts.name, ratio, method, f"{acc:.4f}",
                     f"{acc - artifacts.accuracy:+.4f}"] for ratio, (acc, method) in best.items()]
    return rows, winners


def speed_rows(models: list[tuple[str, Path, Path | None]], quick: bool) -> list[list[str]]:
    """Return table rows: ORT latency of the dense original vs the factorized artifact."""
    rows = []
    for name, program, data in models:
        for ratio in RATIOS:
            config = {"method": "lowrank", "ratio": ratio, "finetune": {"steps": 0},
                      "export": {"form": "factorized", "latency_seconds": 0.5 if quick else 3.0}}
            with tempfile.TemporaryDirectory() as tmp:
                report = run(program, config, data, Path(tmp))
            flops, latency = report["flops"], report["latency"]
            flop_reduction = flops["before"] / flops["after"]
            cells = [name, f"{ratio}", f"{flop_reduction:.2f}×"]
            for batch in ("batch_1_ms", "batch_32_ms"):
                before, after = latency["original"][batch], latency["compressed"][batch]
                cells += [f"{before:.3f} → {after:.3f}", f"{before / after:.2f}×"]
            speedup_32 = latency["original"]["batch_32_ms"] / latency["compressed"]["batch_32_ms"]
            cells.append(f"{speedup_32 / flop_reduction:.2f}")
            cells.append(f"{report['onnx_bytes']['original'] / 1024:.0f} → "
                         f"{report['onnx_bytes']['artifact'] / 1024:.0f} KiB")
            rows.append(cells)
            print(" | ".join(cells), flush=True)
    return rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """Return a markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def write_section(name: str, body: str) -> None:
    """Replace the README section between the `bench:<name>` markers with `body`."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    text = README.read_text() if README.exists() else ""
    block = f"{start}\n{body}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    README.write_text(text)


def machine() -> str:
    """Describe where the figures were taken."""
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}, CUDA {'yes' if torch.cuda.is_available() else 'no'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps, short timings")
    parser.add_argument("--only", choices=("fidelity", "speed"))
    args = parser.parse_args()
    CACHE.mkdir(exist_ok=True)
    examples = [build_digits(CACHE, quick=args.quick), build_text(CACHE, quick=args.quick)]
    stamp = f"_{time.strftime('%Y-%m-%d')}, {machine()}{', --quick' if args.quick else ''}_"
    if args.only in (None, "fidelity"):
        rows, winners = fidelity_rows(examples, args.quick)
        header = ["model", "ratio", "method", "weights kept", "accuracy (ONNX)",
                  "top-1 agreement", "ONNX size factorized", "ONNX size dense",
                  "ORT b32 ms original → factorized"]
        winner_header = ["model", "ratio", "best method after fine-tuning", "accuracy",
                         "vs original"]
        write_section("fidelity", stamp + "\n\n" + markdown(header, rows) + "\n\n" +
                      markdown(winner_header, winners))
    if args.only in (None, "speed"):
        models = [(a.name, a.program, a.data) for a in examples]
        models.append(("random transformer 4×512, seq 128", build_random_transformer(CACHE), None))
        rows = speed_rows(models, args.quick)
        header = ["model", "ratio", "FLOP reduction", "latency b1 (ms)", "speedup b1",
                  "latency b32 (ms)", "speedup b32", "speedup b32 / FLOP reduction", "ONNX size"]
        write_section("speed", stamp + "\n\n" + markdown(header, rows))


if __name__ == "__main__":
    main()
