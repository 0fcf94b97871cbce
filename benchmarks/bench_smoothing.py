"""What int8 smoothing buys in fidelity and costs in latency, input by input, on MiniLM.

    python -m benchmarks.bench_smoothing [--rounds 25] [--leave-one-out]

The original all-MiniLM-L6-v2 (mean-pooled, as `benchmarks.real_models` builds it), smoothed by
`compressor.export.smoothing.smoothed_for_int8` (α 0.5, 256 calibration sentences) with only
some of its MatMul inputs smoothed, exported, then quantized by the product's `quantize_int8`.
Each file's cosine to the float model on 256 held-out sentences, and its onnxruntime latency at
batch 32 × 64 tokens: the files are timed in turn, `--rounds` rounds, medians. Writes
`results/smoothing.json`. With `--leave-one-out`, each input's smoothing left out of "all" and
taken alone instead (cosines only, 52 files), next to the share of its simulated int8 error that
smoothing it leaves: `results/smoothing-leave-one-out.json`.
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
LEAVE_ONE_OUT = Path(__file__).parent / "results" / "smoothing-leave-one-out.json"
SAMPLES = 256


def _width(readers) -> int:
    return readers[0].weight.shape[1]


# Which inputs are smoothed: (name, keep(input node, its readers) -> bool; None: the product's
# choice, those whose smoothing cuts their simulated int8 error enough).
VARIANTS: list[tuple[str, Callable | None]] = [
    ("none", lambda source, readers: False),
    ("all", lambda source, readers: True),
    ("the product's (those worth it)", None),
    ("the LayerNorms' outputs (Q/K/V, FFN up)",
     lambda source, readers: len(readers) == 3 or readers[0].weight.shape[0] == 1536),
    ("those and the attention output's input",
     lambda source, readers: _width(readers) != 1536),
]


def _smoothed(module, calibration, keep):
    """Return `module` smoothed for int8 on the inputs `keep` chooses (None: the product's
    choice), and how many it divides."""
    from compressor.export import smoothing

    if keep is None:
        smoothed = smoothing.smoothed_for_int8(module, calibration, 0.5)
    else:
        everything = smoothing._uses_by_input

        def chosen(graph_module):
            return {source: readers for source, readers in everything(graph_module).items()
                    if keep(source, readers)}

        with (mock.patch.object(smoothing, "_uses_by_input", chosen),
              mock.patch.object(smoothing, "WORTH_SMOOTHING", float("inf"))):
            smoothed = smoothing.smoothed_for_int8(module, calibration, 0.5)
    return smoothed, smoothing.divided_inputs(smoothed)


class MiniLM:
    """The original MiniLM as a graph module, its calibration batches and held-out sentences,
    and the float model's embeddings of them."""

    def __init__(self, work: Path) -> None:
        from transformers import BertModel

        folder = minilm_directory(work)
        model = MeanPooledEncoder(BertModel.from_pretrained(
            str(folder), local_files_only=True, attn_implementation="eager")).eval()
        self.inputs = tokenize(folder, docstring_sentences(MINILM_TRAIN + MINILM_EVAL),
                               MINILM_TOKENS)
        self.calibration = [{k: v[i:i + 32] for k, v in self.inputs.items()}
                            for i in range(0, SAMPLES, 32)]
        self.held_out = {k: v[MINILM_TRAIN:MINILM_TRAIN + SAMPLES]
                         for k, v in self.inputs.items()}
        batch = torch.export.Dim("batch", min=1, max=4096)
        with torch.no_grad():
            self.module = torch.export.export(
                model, (), {k: v[:4] for k, v in self.inputs.items()},
                dynamic_shapes={"input_ids": {0: batch}, "attention_mask": {0: batch}}).module()
            self.reference = self.module(**self.held_out)
        self.work = work

    def int8(self, keep, path: Path):
        """Return an onnxruntime session of the int8 model smoothed as `keep` says (written
        to `path`), its held-out cosine to the float model, and its number of Mul nodes."""
        import onnxruntime as ort

        from compressor.export.quantize import quantize_int8

        smoothed, muls = _smoothed(self.module, self.calibration, keep)
        float_path = path.with_name(path.stem + "-float.onnx")
        with torch.no_grad():
            torch.onnx.export(smoothed, (), str(float_path),
                              kwargs={k: v[:2] for k, v in self.inputs.items()}, dynamo=True,
                              dynamic_shapes={"input_ids": {0: "batch"},
                                              "attention_mask": {0: "batch"}})
        quantize_int8(float_path, path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = os.cpu_count() or 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feeds = {k: v.numpy() for k, v in self.held_out.items()}
        out = torch.from_numpy(session.run(None, feeds)[0])
        cosine = torch.nn.functional.cosine_similarity(out, self.reference, dim=-1).mean().item()
        return session, round(cosine, 4), muls


def leave_one_out(minilm: MiniLM) -> dict:
    """Each input's smoothing, left out of "all" and alone: the int8 model's cosine each way,
    next to the share of its MatMuls' simulated int8 error that smoothing it leaves."""
    from compressor.export import smoothing

    uses = smoothing._uses_by_input(minilm.module)
    ranges, _ = smoothing._input_ranges(minilm.module, uses, minilm.calibration)
    scales = {source: smoothing._scale(ranges[source], 0.5) for source in uses}
    errors = smoothing._int8_errors(minilm.module, uses, scales, minilm.calibration)
    path = minilm.work / "int8.onnx"
    rows = []
    for source, readers in uses.items():
        plain, smoothed = errors[source]
        row = {"input": source.name, "read_by": [list(use.weight.shape) for use in readers],
               "error_left": round(smoothed / plain, 3)}
        for name, keep in (("cosine_without_it", lambda s, r, n=source.name: s.name != n),
                           ("cosine_it_alone", lambda s, r, n=source.name: s.name == n)):
            row[name] = minilm.int8(keep, path)[1]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"all": minilm.int8(lambda s, r: True, path)[1],
            "none": minilm.int8(lambda s, r: False, path)[1], "inputs": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--leave-one-out", action="store_true")
    args = parser.parse_args()
    minilm = MiniLM(Path(tempfile.mkdtemp(prefix="bench-smoothing-")))
    if args.leave_one_out:
        result = leave_one_out(minilm)
        LEAVE_ONE_OUT.write_text(json.dumps(result, indent=1) + "\n")
        return
    rows, sessions = [], {}
    for index, (name, keep) in enumerate(VARIANTS):
        session, cosine, muls = minilm.int8(keep, minilm.work / f"{index}-int8.onnx")
        sessions[name] = session
        rows.append({"inputs_smoothed": name, "mul_nodes": muls, "cosine": cosine})
    feeds = {k: v[:32].numpy() for k, v in minilm.held_out.items()}
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
