"""What a fine-tuning step of a real language model costs on this machine, by what it trains on.

    python -m benchmarks.bench_lm_steps [--model gemma3-270m] [--ratio 0.8] [--steps 3]
        [--variants 1024:64,1024:full,4096:64,512:64]

One student (the job's own stages: load, calibrate, plan at `--ratio` with a uniform allocation,
rewrite), then for each variant `tokens:k` a few fine-tuning steps with
`finetune.tokens_per_step` = tokens and `finetune.logits_top_k` = k (`full`: the whole
vocabulary, KL + MSE, the original run at every step unless its outputs on the training split
fit in 512 MiB). Figures per variant: seconds from the call to the first step (the original's
targets on the training split, when kept, and the step-memory probe), median seconds per step
(the first step excluded), tokens per second, and the process's peak resident memory. The
text is `bench_lm`'s (120 documentation paragraphs in 128-token windows). Results go to
`results/lm_steps.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

from benchmarks.bench_lm import CACHE, LENGTH, gemma_folder, paragraphs
from compressor.config import CompressionConfig
from compressor.finetune.loop import Distillation, HeldOut, finetune_
from compressor.load.data import Dataset
from compressor.load.stage import load
from compressor.plan.stage import calibrate_layers, plan
from compressor.rewrite.stage import rewrite
from compressor.runtime.context import JobContext
from compressor.runtime.joblog import JobLog
from compressor.runtime.objectives import KL_TEMPERATURE
from compressor.runtime.progress import JobControl
from compressor.runtime.top_logits import TopKOutputs

RESULTS = Path(__file__).parent / "results" / "lm_steps.json"


def folder_of(model: str) -> Path:
    if model == "gemma3-270m":
        return gemma_folder()
    from benchmarks import gpt2_pydoc  # the small GPT-2 trained here

    return gpt2_pydoc.folder()


def student_of(folder: Path, ratio: float, workdir: Path):
    """Return the loaded job and a student at `ratio` (uniform allocation), as a job makes it."""
    train = workdir / "train.txt"
    train.write_text("\n".join(paragraphs()[:120]) + "\n")
    config = CompressionConfig.parse({
        "ratio": ratio, "allocation": "uniform", "data": {"max_length": LENGTH},
        "export": {"form": "factorized"}})
    log = JobLog(workdir / "job.log")
    control = JobControl()
    loaded = load(folder, train, config, workdir, control, log)
    job = JobContext(loaded.costs, control, log, None)
    planned = plan(loaded, calibrate_layers(loaded, config, job), config, job)
    return loaded, planned.plan, rewrite(loaded, planned, "sum", job), config


def time_steps(loaded, plan_, student, base: CompressionConfig, tokens: int, k: int | None,
               steps: int) -> dict:
    """Run `steps` steps of one variant; return its figures."""
    config = base.finetune.model_copy(update={
        "steps": steps, "eval_every": 10**6, "tokens_per_step": tokens, "logits_top_k": k,
        "warmup_steps": 0, "checkpoint_every": 0})
    top_k = TopKOutputs(k, tuple(loaded.next_token), KL_TEMPERATURE)
    scored = Dataset(loaded.held_out.take(torch.arange(2)), False, "held-out")  # the last step's
    held_out = HeldOut.of(loaded.teacher, scored, 2, top_k)
    lesson = Distillation(loaded.teacher, loaded.kinds, loaded.train, held_out)
    stamps: list[float] = []

    def progress(event) -> None:
        if event.stage == "finetuning" and event.message.startswith("step "):
            stamps.append(time.perf_counter())

    start = time.perf_counter()
    summary = finetune_(student, plan_, lesson, config, JobControl(progress), initial_score=0.0)
    per_step = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    median = statistics.median(per_step) if per_step else None
    return {"tokens_per_step": summary.tokens_per_step,
            "samples_per_step": summary.samples_per_step, "logits_top_k": summary.logits_top_k,
            "teacher_outputs_cached": summary.teacher_outputs_cached,
            "blocks_checkpointed": summary.activation_checkpointing,
            "first_step_after_s": (stamps[0] - start) if stamps else None,
            "step_s": median, "tokens_per_s": (summary.tokens_per_step / median
                                               if median else None),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variants", default="1024:64,1024:full,4096:64,512:64")
    args = parser.parse_args()
    workdir = CACHE / f"steps-{args.model}"
    workdir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    started = time.perf_counter()
    loaded, plan_, student, config = student_of(folder_of(args.model), args.ratio, workdir)
    results = {"model": args.model, "ratio": args.ratio, "steps": args.steps,
               "machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "load_before": load_before, "student_s": time.perf_counter() - started,
               "train_samples": len(loaded.train), "variants": {}}
    for variant in args.variants.split(","):  # each one saved as it ends: a variant is minutes
        tokens, k = variant.split(":")
        figures = time_steps(loaded, plan_, student, config, int(tokens),
                             None if k == "full" else int(k), args.steps)
        results["variants"][variant] = {**figures, "load_after": os.getloadavg()}
        print(variant, json.dumps(figures), flush=True)
        saved = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
        saved[args.model] = results
        RESULTS.write_text(json.dumps(saved, indent=1))


if __name__ == "__main__":
    main()
