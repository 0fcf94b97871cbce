"""Shared helpers of the tying methods (tie_inputs, tie_rows, share_values).

- k-means on rows (k-means++ seeding, Lloyd iterations) and on scalars (sort-based 1-D Lloyd),
  both deterministic: the same weight always gives the same structure;
- group means, the least-squares θ for a fixed assignment;
- the "mean" gradient reduction, done inside the autograd graph;
- the smallest index dtype for a count, and frozen copies for the compact modules.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from compressor.methods.base import GradReduction, damped_cholesky, int_bits

_KMEANS_SEED = 0
_LLOYD_ITERATIONS = 20
_VALUE_ITERATIONS = 100
# 1-D k-means stops once a Lloyd step lowers the squared error by less than this fraction.
_VALUE_TOLERANCE = 1e-4
# Above this many multiply-adds (rows · groups · row length), k-means++ seeding (sequential, one
# pass over the rows per group) gives way to a seeded random subset of the rows.
_PLUSPLUS_WORK_LIMIT = 4e9
# Relative squared distance under which two rows count as the same row when seeding (float32).
_SAME_ROW = 1e-5
# Distances computed at once while assigning rows: bounds the (rows × groups) block in memory.
_DISTANCE_BLOCK = 1 << 24
# Relative damping added to the Gram diagonal so its Cholesky factor exists.
_GRAM_DAMPING = 1e-4

_INDEX_DTYPES = {8: torch.uint8, 16: torch.uint16, 32: torch.int32}


def index_dtype(count: int) -> torch.dtype:
    """Return the smallest integer dtype whose values index `count` entries (uint8/uint16/int32)."""
    if count > 2**31:
        return torch.int64
    return _INDEX_DTYPES[int_bits(count)]


def frozen(tensor: torch.Tensor) -> nn.Parameter:
    """Return `tensor` as a non-trainable parameter, sharing its storage (θ is final by now)."""
    return nn.Parameter(tensor.detach(), requires_grad=False)


def copy_counts(idx: torch.Tensor, groups: int) -> torch.Tensor:
    """Return how many entries of `idx` point at each of `groups` groups (at least 1 each)."""
    return torch.bincount(idx.reshape(-1).to(torch.int64), minlength=groups).clamp_(min=1)


def group_means(values: torch.Tensor, idx: torch.Tensor, groups: int) -> torch.Tensor:
    """Return the mean of the rows of `values` in each group (float64; zeros for an empty group).

    `values` is (n, d) or (n,), `idx` (n,): the least-squares θ for the assignment `idx`.
    """
    idx = idx.reshape(-1).to(device=values.device, dtype=torch.int64)
    values = values.to(torch.float64)
    sums = values.new_zeros((groups, *values.shape[1:])).index_add_(0, idx, values)
    counts = copy_counts(idx, groups).to(torch.float64)
    return sums / counts.reshape(-1, *([1] * (values.dim() - 1)))


class _MeanOfCopies(torch.autograd.Function):
    """Pass θ through unchanged; divide each entry's gradient by its number of copies."""

    @staticmethod
    def forward(theta: torch.Tensor, copies: torch.Tensor) -> torch.Tensor:
        return theta.view_as(theta)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (copies,) = ctx.saved_tensors
        return grad / copies, None


def reduce_grad(theta: torch.Tensor, reduction: GradReduction,
                copies: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Return θ itself; with "mean", its gradient becomes the average over its copies.

    Autograd already sums the gradients of every use of a shared entry ("sum"). For "mean" each
    entry's gradient is divided by its copy count, `copies()` (broadcastable to θ), inside the
    graph. Outside training (no grad, frozen θ, or while torch.export traces) this is a no-op.
    """
    if (reduction == "sum" or not torch.is_grad_enabled() or not theta.requires_grad
            or torch.compiler.is_exporting()):
        return theta
    return _MeanOfCopies.apply(theta, copies().to(theta.dtype))


def whiten(rows: torch.Tensor, gram: torch.Tensor) -> torch.Tensor | None:
    """Return rows @ L with G = L Lᵀ (damped), so that ‖(a − b) L‖ is the error on the inputs.

    None when the Gram matrix has no Cholesky factor even after damping.
    """
    chol = damped_cholesky(gram.to(rows.device), _GRAM_DAMPING)
    return None if chol is None else rows.to(torch.float64) @ chol


def kmeans_rows(points: torch.Tensor, groups: int, *, seed: int = _KMEANS_SEED,
                iterations: int = _LLOYD_ITERATIONS) -> torch.Tensor:
    """Return the k-means group (int64, 0..groups-1) of each row of `points`.

    Deterministic: k-means++ seeding from a fixed seed (a seeded random subset for very large
    problems), then Lloyd iterations until the assignment stops changing. Distances are float32
    matmuls, centers float64 means. An emptied group is re-seeded at the row farthest from its
    center. With `groups` = rows and distinct rows every row is its own group.
    """
    points = points.detach().to(torch.float64)
    coarse = points.to(torch.float32)
    generator = torch.Generator().manual_seed(seed)
    if points.shape[0] * groups * points.shape[1] <= _PLUSPLUS_WORK_LIMIT:
        chosen = _plusplus_seeds(coarse, groups, generator)
    else:
        chosen = torch.randperm(points.shape[0], generator=generator)[:groups]
    centers = points[chosen.to(points.device)]
    idx = None
    for _ in range(iterations):
        new_idx = _nearest_center(coarse, centers.to(torch.float32))
        counts = torch.bincount(new_idx, minlength=groups)
        # An emptied group keeps its old center until it is re-seeded.
        centers = torch.where((counts > 0)[:, None], group_means(points, new_idx, groups), centers)
        reseeded = _reseed_empty(points, new_idx, centers, counts)
        if idx is not None and torch.equal(new_idx, idx) and not reseeded:
            break
        idx = new_idx
    return idx


def _plusplus_seeds(points: torch.Tensor, groups: int,
                    generator: torch.Generator) -> torch.Tensor:
    rows = points.shape[0]
    norms = points.square().sum(1)

    def squared_distances(center: int) -> torch.Tensor:
        distance = (norms - 2 * (points @ points[center]) + norms[center]).clamp_(min=0)
        # Below the rounding of the expanded form: a chosen row (or its duplicate) is at 0.
        return torch.where(distance > _SAME_ROW * (norms + norms[center]), distance, 0)

    chosen = [int(torch.randint(rows, (), generator=generator))]
    nearest = squared_distances(chosen[0])
    for _ in range(1, groups):
        cumulative = nearest.cumsum(0)
        total = float(cumulative[-1])
        if total <= 0:  # fewer distinct rows than groups: the rest start as duplicates
            break
        draw = float(torch.rand((), generator=generator, dtype=torch.float64)) * total
        chosen.append(min(int(torch.searchsorted(cumulative, draw, right=True)), rows - 1))
        nearest = torch.minimum(nearest, squared_distances(chosen[-1]))
    taken = set(chosen)
    chosen += [i for i in range(rows) if i not in taken][: groups - len(chosen)]
    return torch.tensor(chosen)


def _nearest_center(points: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    center_norms = centers.square().sum(1)
    block = max(1, _DISTANCE_BLOCK // max(1, centers.shape[0]))
    # ‖x − c‖² = ‖x‖² − 2 x·c + ‖c‖²; ‖x‖² is the same for every center of a row.
    return torch.cat([
        (center_norms - 2 * chunk @ centers.T).argmin(1) for chunk in points.split(block)
    ])


def _reseed_empty(points: torch.Tensor, idx: torch.Tensor, centers: torch.Tensor,
                  counts: torch.Tensor) -> bool:
    empty = (counts == 0).nonzero().flatten()
    if empty.numel() == 0:
        return False
    distance = (points - centers[idx]).square().sum(1)
    farthest = distance.topk(min(empty.numel(), distance.numel())).indices
    farthest = farthest[distance[farthest] > 0]
    if farthest.numel() == 0:
        return False
    centers[empty[: farthest.numel()]] = points[farthest]
    return True


def kmeans_values(values: torch.Tensor, count: int, *,
                  iterations: int = _VALUE_ITERATIONS) -> torch.Tensor:
    """Return the 1-D k-means cluster (int64, 0..count-1, `values`' shape) of every scalar.

    Codebook entries start evenly spaced over [min, max] (Deep Compression's linear init) and
    clusters stay sorted, so each is a contiguous run of the sorted values: one Lloyd step costs
    O(count · log n) with prefix sums; it stops when the squared error stops falling. An empty
    cluster takes over the upper half of the cluster with the largest squared error. With at most
    `count` distinct values each has its own cluster.
    """
    # Sorted in the weight's own dtype (same order as float64, cheaper); `order` maps back.
    # Memory: every array here is as long as the weight, so none is made that is not needed,
    # none twice, and none wider than it must be (Gemma-3 270M's tied 262,144 x 640 table made
    # a search peak at 10.5 GiB: 15x the table's bytes; then 8x; this keeps 5x): the order in
    # int32, the squared error from one sum of squares rather than a second prefix sum.
    ordered, order = values.detach().reshape(-1).sort()
    order = _narrowest_index(order)
    ordered = ordered.to(torch.float64)
    if int((ordered[1:] != ordered[:-1]).sum()) < count:  # at most `count` distinct values
        _, runs = torch.unique_consecutive(ordered, return_counts=True)
        return _label_runs(runs, order, values.shape)
    prefix = _prefix_sums(ordered)
    squares = float(torch.dot(ordered, ordered))  # the squared error is this less Σ sums·centers
    n = torch.tensor([ordered.numel()], device=ordered.device)
    centers = torch.linspace(float(ordered[0]), float(ordered[-1]), count,
                             dtype=torch.float64, device=ordered.device)
    last_error = math.inf
    for _ in range(iterations):
        cuts = torch.searchsorted(ordered, (centers[:-1] + centers[1:]) / 2)
        starts, ends = torch.cat([n.new_zeros(1), cuts]), torch.cat([cuts, n])
        sizes = ends - starts
        sums = prefix[ends] - prefix[starts]
        centers = torch.where(sizes > 0, sums / sizes.clamp(min=1), centers)
        empty = (sizes == 0).nonzero().flatten()
        if empty.numel():
            error = _cluster_errors(ordered, starts, ends, centers)
            _split_largest(centers, empty, error, starts, ends, prefix)
            centers = centers.sort().values
            last_error = float(error.sum())
            continue
        error_sum = squares - float((sums * centers).sum())  # Σ over clusters of Σx² − n·mean²
        if error_sum >= (1 - _VALUE_TOLERANCE) * last_error:
            break
        last_error = error_sum
    cuts = torch.searchsorted(ordered, (centers[:-1] + centers[1:]) / 2)
    del ordered, prefix  # the labels below take as much again
    return _label_runs(torch.cat([cuts, n]).diff(prepend=n.new_zeros(1)), order, values.shape)


def _narrowest_index(order: torch.Tensor) -> torch.Tensor:
    """Return `order` (int64 positions) as int32 when every position fits in it."""
    return order.to(torch.int32) if order.numel() <= torch.iinfo(torch.int32).max else order


def _cluster_errors(ordered: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor,
                    centers: torch.Tensor) -> torch.Tensor:
    """Return each cluster's squared error about its center (clusters are runs of `ordered`),
    one cluster at a time: only when a cluster is empty, to choose which to split."""
    errors = torch.zeros_like(centers)
    for j, (start, end) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
        if end > start:
            deviation = ordered[start:end] - centers[j]
            errors[j] = torch.dot(deviation, deviation)
    return errors


def _prefix_sums(ordered: torch.Tensor) -> torch.Tensor:
    """Return [0, cumulative sums of `ordered`], made in one array."""
    prefix = ordered.new_empty(ordered.numel() + 1)
    prefix[0] = 0
    prefix[1:].copy_(ordered).cumsum_(0)
    return prefix


def _label_runs(sizes: torch.Tensor, order: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    # Run j of the sorted values (sizes[j] of them) is cluster j; `order` puts labels back.
    # Made in int32 (`sizes` has at most 65,536 runs), returned in int64.
    labels = torch.repeat_interleave(
        torch.arange(sizes.numel(), device=sizes.device, dtype=torch.int32), sizes)
    idx = torch.empty_like(labels)
    idx[order] = labels
    del labels
    return idx.to(torch.int64).reshape(shape)


def _split_largest(centers: torch.Tensor, empty: torch.Tensor, error: torch.Tensor,
                   starts: torch.Tensor, ends: torch.Tensor, prefix: torch.Tensor) -> None:
    splittable = (ends - starts >= 2) & (error > 0)
    order = torch.where(splittable, error, error.new_tensor(-1.0)).argsort(descending=True)
    donors = order[: min(empty.numel(), int(splittable.sum()))]
    if donors.numel() == 0:
        return
    start, end = starts[donors], ends[donors]
    middle = (start + end) // 2
    centers[donors] = (prefix[middle] - prefix[start]) / (middle - start)
    centers[empty[: donors.numel()]] = (prefix[end] - prefix[middle]) / (end - middle)
