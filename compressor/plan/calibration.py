"""Calibrate: the statistics of each planned layer's inputs, and what its method prepares of them.

One pass of the original over calibration samples records what each layer whose method needs
it sees: the Gram matrix of a Linear's or Conv2d's input rows, how often an embedding reads each
row (`collect_layer_stats`). Each layer's method then prepares what its allocation and
initialization reuse (`Method.prepare`: lowrank's decomposition), as soon as the layer's
statistics are complete (`calibrate`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch import fx

from compressor.load.data import Dataset
from compressor.plan.kept import KeptPreparations
from compressor.plan.layers import layer_calls, layer_input, run_recording
from compressor.plan.planning import Plan
from compressor.runtime.context import JobContext
from compressor.runtime.costs import MIN_SAMPLES, SampleCosts
from compressor.runtime.layers import (
    LayerInfo,
    LayerStats,
    add_product_,
    empty_stats,
    layer_weight,
    rows_layout,
)
from compressor.runtime.outputs import call
from compressor.vocabulary import CALIBRATING

# Activation-aware init keeps an (in × in) float64 Gram per layer; past this it falls back to SVD.
MAX_GRAM_FEATURES = 8192
# All Gram matrices of one job together stay float64 up to this size, or up to this fraction of
# the model's own bytes when that is more; float32 beyond.
GRAM_FLOAT64_BYTES = 1 << 28
GRAM_FLOAT64_PER_MODEL_BYTE = 0.5
# Calibration samples wanted, at most (the sample costs may afford fewer).
CALIBRATION_SAMPLES = 512
# Samples a forward pass is timed on, to size calibration to a time budget.
PACE_SAMPLES = 4


def calibrate(teacher: fx.GraphModule, plan: Plan, train: Dataset,
              job: JobContext) -> dict[str, LayerStats]:
    """Return the statistics the planned layers' initialization uses, by layer name.

    For the layers whose method needs them: the inputs each layer sees on calibration samples
    (a Gram matrix, an embedding's row reads). Layers whose method prepares something from them
    (`Method.prepare`) get it in `stats[name].prepared`, which both the allocation and the
    initialization read, and their Gram matrix is dropped as soon as it is used. When every
    calibration sample fits in memory at once, each layer is prepared as the calibration pass
    reaches it, so one Gram matrix is alive at a time. A job that keeps products for a retry
    (`job.resume`) keeps each layer's as it is made, and takes those an earlier try kept
    (`compressor.plan.kept`) instead of preparing them again.
    """
    stats: dict[str, LayerStats] = {}
    preparing = {p.layer.name: p for p in plan.compressed if p.method.prepares}
    prepared = 0
    kept: KeptPreparations | None = None  # what a retried job's earlier tries prepared

    def complete(name: str, entry_stats: LayerStats) -> None:
        nonlocal prepared
        stats[name] = entry_stats
        entry = preparing.get(name)
        if entry is None:
            return
        prepared += 1
        job.control.report(CALIBRATING, 0.1 + 0.8 * prepared / len(preparing),
                           f"decomposing layer {prepared}/{len(preparing)}: {name}")
        weight = layer_weight(teacher, entry.layer).detach()
        product = None if kept is None else kept.load(entry, weight)
        if product is None:
            product = entry.method.prepare(
                entry.layer, weight, entry_stats if entry.method.needs_input_stats else None,
                entry.size)
            if kept is not None:
                kept.save(entry, product)
        # Its own statistics, without the Gram matrix (others reading it may still use it).
        stats[name] = LayerStats(None, entry_stats.rows, entry_stats.row_counts, product)

    needing = [p.layer for p in plan.compressed if p.method.needs_input_stats]
    if job.resume is not None and preparing:
        kept = KeptPreparations(job.resume, "no statistics", job.log.info)
    if needing:
        job.control.report(CALIBRATING, 0.05, f"calibrating {len(needing)} layers")
        wanted = min(len(train), CALIBRATION_SAMPLES)
        samples = _within_budget(teacher, train, job.costs.calibration_samples(wanted), job)
        batch_size = job.costs.calibration_batch(samples)
        job.log.info(f"calibrating on {samples} of {wanted} samples, {batch_size} at a time"
                     + (" (each layer decomposed as it is reached)"
                        if batch_size >= samples else ""))
        if kept is not None:
            kept.calibration = f"{samples} samples, {batch_size} at a time"
        calibration = train.take(torch.arange(samples))
        batches = list(Dataset(calibration, train.synthetic, train.source).batches(batch_size))
        collect_layer_stats(teacher, needing, batches, complete)
    for name in preparing:
        if name not in stats:  # no statistics (svd init, or a layer too wide for a Gram)
            complete(name, LayerStats(None))
    if kept is not None and kept.reused:
        job.log.info(f"calibration: reused {len(kept.reused)} of {len(preparing)} layers' "
                     "prepared products (decompositions) kept by an earlier try")
        job.reused(f"decompositions ({len(kept.reused)} of {len(preparing)} layers)")
    return stats


def _within_budget(teacher: fx.GraphModule, train: Dataset, samples: int,
                   job: JobContext) -> int:
    """Return `samples`, or fewer when the job's time budget would not cover them: a forward
    pass on a few samples is timed, and calibration takes what that pace affords in its share
    of the budget left (`SampleCosts.calibration_samples_in`), recording the cut."""
    budget = job.control.budget
    if not budget.limited or samples <= MIN_SAMPLES:
        return samples
    # no more samples at once than calibration itself runs (memory)
    probe = train.take(torch.arange(min(samples, PACE_SAMPLES,
                                        job.costs.calibration_batch(samples))))
    started = budget.elapsed_s()
    with torch.no_grad():
        call(teacher, probe)
    per_sample = (budget.elapsed_s() - started) / len(next(iter(probe.values())))
    left = budget.left_s() - budget.reserve_s
    affordable = SampleCosts.calibration_samples_in(left, per_sample, samples)
    if affordable < samples:
        budget.cut(f"calibration on {affordable} of {samples} samples")
        job.log.info(f"calibration: {affordable} of {samples} samples fit the time budget "
                     f"({budget.describe()}; a forward pass takes {per_sample:.2g} s a sample)")
    return affordable


def collect_layer_stats(module: fx.GraphModule, layers: list[LayerInfo],
                        batches: list[dict[str, torch.Tensor]],
                        on_complete: Callable[[str, LayerStats], None] | None = None,
                        ) -> dict[str, LayerStats]:
    """Return each layer's input statistics summed over `batches` (for activation-aware init):
    the Gram matrix of a Linear's or Conv2d's inputs, how often an embedding reads each row.

    Layers that read the same tensor the same way (the query, key and value projections of an
    attention block) share one Gram matrix: it is computed once and stored once. Gram matrices
    are float64 unless all of them together would pass both `GRAM_FLOAT64_BYTES` and
    `GRAM_FLOAT64_PER_MODEL_BYTE` × the model's bytes; then float32. They are summed a chunk
    of rows at a time (`add_product_`).

    With `on_complete`, each layer's statistics are handed to it as soon as they are complete
    and are not kept (nothing is returned): with a single batch that is as the layer is reached,
    so only one Gram matrix (or one group's) is alive at a time; with several, after the last.
    """
    wanted = [layer for layer in layers
              if layer.spec.reads_rows or layer.in_features <= MAX_GRAM_FEATURES]
    by_name = {layer.name: layer for layer in wanted}
    readers = _shared_inputs(module, by_name)
    grams = {key: layers_[0] for key, layers_ in readers.items()}
    streaming = on_complete is not None and len(batches) == 1
    gram_bytes = sum(8 * layer.in_features ** 2 for layer in grams.values()
                     if not layer.spec.reads_rows)
    if streaming:  # one group at a time
        gram_bytes = max([0] + [8 * layer.in_features ** 2 for layer in grams.values()])
    model_bytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    limit = max(GRAM_FLOAT64_BYTES, GRAM_FLOAT64_PER_MODEL_BYTE * model_bytes)
    dtype = torch.float64 if gram_bytes <= limit else torch.float32
    shared: dict[tuple, LayerStats] = {}
    first = {layer: key for key, layer in grams.items()}
    calls = Counter(layer_calls(module).values())
    calls_left = {key: calls.get(layer.name, 0) for key, layer in grams.items()}
    collected: dict[str, LayerStats] = {}
    complete = on_complete or collected.__setitem__

    def finish(key: tuple) -> None:
        entry = shared.pop(key, None) or empty_stats(grams[key], dtype)
        for layer in readers[key]:
            complete(layer.name, LayerStats(entry.gram, entry.rows, entry.row_counts))

    def record(layer: LayerInfo, x: torch.Tensor) -> None:
        key = first.get(layer)
        if key is None:
            return  # another reader of the same input already counted it
        entry = shared.get(key) or shared.setdefault(key, empty_stats(layer, dtype))
        if layer.spec.reads_rows:
            ids = x.reshape(-1).to(torch.int64)
            entry.row_counts += torch.bincount(ids, minlength=layer.out_features)[
                :layer.out_features].to(torch.float64)
            entry.rows += ids.numel()
        else:
            rows = layer.spec.input_rows(layer, x)
            add_product_(entry.gram, rows, rows)
            entry.rows += rows.shape[0]
        calls_left[key] -= 1
        if streaming and calls_left[key] == 0:
            finish(key)

    for batch in batches:
        run_recording(module, list(first), batch, record)
    for key in list(grams):
        if not streaming or key in shared or calls_left[key] > 0:
            finish(key)
    return collected


def _shared_inputs(module: fx.GraphModule,
                   layers: dict[str, LayerInfo]) -> dict[tuple, list[LayerInfo]]:
    """Group `layers` by what their statistics are computed from: the node feeding them and how
    they read it (kind, kernel, stride, padding, dilation). A layer called more than once, or
    not found in the graph, is a group of its own."""
    calls: dict[str, list[fx.Node]] = {}
    for node, name in layer_calls(module).items():
        calls.setdefault(name, []).append(node)
    groups: dict[tuple, list[LayerInfo]] = {}
    for name, layer in layers.items():
        nodes = calls.get(name, [])
        source = layer_input(nodes[0]).name if len(nodes) == 1 else f"layer:{name}"
        key = (source, *rows_layout(layer))
        groups.setdefault(key, []).append(layer)
    return groups
