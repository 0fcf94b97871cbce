"""What int8 smoothing buys in fidelity and costs in latency, input by input, on MiniLM.

    python -m benchmarks.bench_smoothing [--rounds 25]

The original all-MiniLM-L6-v2 (mean-pooled, as `benchmarks.real_models` builds it), smoothed by
`compressor.export.smoothing.smoothed_for_int8` (α 0.5, 256 calibration sentences) with only
some of its MatMul inputs smoothed, exported, then quantized by the product's `quantize_int8`.
Each file's cosine to the float model on 256 held-out sentences, and its onnxruntime latency at
batch 32 × 64 tokens: the files are timed in turn, `--rounds` rounds, medians. Writes
`results/smoothing.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from benchmarks.real_models import (
    MINILM_EVAL,
    MINILM_TOKENS,
    MINILM_TRAIN,
    MeanPooledEncoder,
    docstring_sentences,
    minilm_directory,
    tokenize,
)

RESULTS = Path(__file__).parent / "results" / "smoothing.json"
SAMPLES = 256


def _width(readers) -> int:
    return readers[0].weight.shape[1]


# Which inputs are smoothed: (name, keep(readers of one input) -> bool).
VARIANTS: list[tuple[str, Callable]] = [
    ("none", lambda readers: False),
    ("all (the product)", lambda readers: True),
    ("the LayerNorms' outputs (Q/K/V, FFN up)",
     lambda readers: len(readers) == 3 or readers[0].weight.shape[0] == 1536),
    ("those and the attention output's input", lambda readers: _width(readers) != 1536),
]


def _smoothed(module, calibration, keep):
    from compressor.export import smoothing

    everything = smoothing._uses_by_input

    def chosen(graph_module):
        return {source: readers for source, readers in everything(graph_module).items()
                if keep(readers)}

    with mock.patch.object(smoothing, "_uses_by_input", chosen):
        smoothed = smoothing.smoothed_for_int8(module, calibration, 0.5)
    return smoothed, len(chosen(smoothed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    args = parser.parse_args()
    import onnxruntime as ort
    from transformers import BertModel

    from compressor.export.quantize import quantize_int8

    work = Path(tempfile.mkdtemp(prefix="bench-smoothing-"))
    folder = minilm_directory(work)
    model = MeanPooledEncoder(BertModel.from_pretrained(
        str(folder), local_files_only=True, attn_implementation="eager")).eval()
    inputs = tokenize(folder, docstring_sentences(MINILM_TRAIN + MINILM_EVAL), MINILM_TOKENS)
    calibration = [{k: v[i:i + 32] for k, v in inputs.items()} for i in range(0, SAMPLES, 32)]
    held_out = {k: v[MINILM_TRAIN:MINILM_TRAIN + SAMPLES] for k, v in inputs.items()}
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        module = torch.export.export(
            model, (), {k: v[:4] for k, v in inputs.items()},
            dynamic_shapes={"input_ids": {0: batch}, "attention_mask": {0: batch}}).module()
        reference = module(**held_out)
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    rows, sessions = [], {}
    for index, (name, keep) in enumerate(VARIANTS):
        smoothed, inputs_smoothed = _smoothed(module, calibration, keep)
        float_path, int8_path = work / f"{index}.onnx", work / f"{index}-int8.onnx"
        with torch.no_grad():
            torch.onnx.export(smoothed, (), str(float_path),
                              kwargs={k: v[:2] for k, v in inputs.items()}, dynamo=True,
                              dynamic_shapes={"input_ids": {0: "batch"},
                                              "attention_mask": {0: "batch"}})
        quantize_int8(float_path, int8_path)
        session = ort.InferenceSession(str(int8_path), options,
                                       providers=["CPUExecutionProvider"])
        out = torch.from_numpy(session.run(None, {k: v.numpy() for k, v in held_out.items()})[0])
        cosine = torch.nn.functional.cosine_similarity(out, reference, dim=-1).mean().item()
        sessions[name] = session
        rows.append({"inputs_smoothed": name, "mul_nodes": inputs_smoothed,
                     "cosine": round(cosine, 4)})
    feeds = {k: v[:32].numpy() for k, v in held_out.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for session in sessions.values():
        session.run(None, feeds)
    for _ in range(args.rounds):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds)
            times[name].append((time.perf_counter() - start) * 1e3)
    for row in rows:
        row["b32_median_ms"] = round(float(np.median(times[row["inputs_smoothed"]])), 1)
    result = {"rows": rows, "rounds": args.rounds, "cores": os.cpu_count(),
              "loadavg": [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]}
    print(json.dumps(result, indent=2))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
