"""Turn the config into a plan: which layers to compress, with which method and size.

One global budget: `ratio` × (weights of the targeted layers) numbers remain. Overrides fix a
layer's method, size or ratio; the remaining layers share one per-layer ratio, found by bisection,
so that the whole plan fits the budget. A layer whose method saves nothing even at its smallest
size stays dense and its weights count against the budget. That uniform plan is where
`compressor.plan.allocation` starts when it re-spreads the lowrank layers' share by sensitivity.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, replace

from compressor.config import CompressionConfig, LayerOverride
from compressor.errors import ConfigError
from compressor.methods import LayerInfo, Method, MethodOptions, configured
from compressor.plan.layers import SkippedLayer
from compressor.runtime.layers import REWRITTEN_LAYERS


@dataclass(frozen=True)
class LayerPlan:
    """One targeted layer: its configured method and size, or `size=None` when it stays dense."""

    layer: LayerInfo
    method: Method
    size: int | None
    compact_numel: float
    reason: str = ""
    adjustable: bool = False  # sized from the global ratio, so allocation may move its size
    sensitivity: float | None = None  # measured loss per unit of output error (allocation)

    @property
    def compressed(self) -> bool:
        """Whether this layer is rewritten (False: it stays dense)."""
        return self.size is not None


@dataclass(frozen=True)
class Plan:
    """The layers to rewrite, the ones left alone, and the budget they were fitted to."""

    layers: tuple[LayerPlan, ...]
    skipped: tuple[SkippedLayer, ...]
    budget: float
    layer_ratio: float
    allocation: str = "uniform"  # how the global budget was spread: uniform or sensitivity
    # compressed layers the compact form exports as their dense W (W = f(θ) made once): where
    # onnxruntime was measured faster on it (objective latency, `compressor.search.layer_forms`).
    # Not part of `to_dict`: it changes no θ, only the export.
    dense_exports: frozenset[str] = frozenset()

    @property
    def compressed(self) -> tuple[LayerPlan, ...]:
        """The layers that are rewritten."""
        return tuple(p for p in self.layers if p.compressed)

    @property
    def targeted_numel(self) -> int:
        """Weights of the targeted layers before compression."""
        return sum(p.layer.numel for p in self.layers)

    @property
    def kept_numel(self) -> float:
        """Weights (float32-number units) of the targeted layers after compression."""
        return sum(p.compact_numel for p in self.layers)

    def to_dict(self) -> dict:
        """Return the plan as plain data for the report."""
        over = self.kept_numel > self.budget * (1 + 1e-9)
        return {
            **({"note": "the budget cannot be met: even the smallest sizes keep more weights "
                        "than `ratio` allows, so every layer uses its smallest size"}
               if over else {}),
            "targeted_weights": self.targeted_numel,
            "kept_weights": round(self.kept_numel),
            "kept_fraction": self.kept_numel / max(1, self.targeted_numel),
            "layer_ratio": self.layer_ratio,
            "allocation": self.allocation,
            "layers": [
                {"name": p.layer.name, "kind": p.layer.kind, "shape": list(p.layer.weight_shape),
                 "method": p.method.name if p.compressed else "dense", "size": p.size,
                 "size_field": p.method.size_field,
                 "weights_before": p.layer.numel, "weights_after": round(p.compact_numel),
                 "share": p.compact_numel / max(1, p.layer.numel),
                 **({"tied_embedding": True} if p.layer.tied_embedding else {}),
                 **({"sensitivity": p.sensitivity} if p.sensitivity is not None else {}),
                 **({"reason": p.reason} if p.reason else {})}
                for p in self.layers
            ],
            "skipped": [asdict(s) for s in self.skipped],
        }


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _override_for(name: str, overrides: list[LayerOverride]) -> LayerOverride | None:
    return next((o for o in overrides if fnmatch.fnmatchcase(name, o.match)), None)


class _Planner:
    def __init__(self, config: CompressionConfig) -> None:
        self.config = config
        self._methods: dict[int, Method] = {}  # one configured method per options object

    def method_for(self, override: LayerOverride | None) -> Method:
        """Return the configured method of a layer: its override's, else the job's."""
        options: MethodOptions = (override.method if override and override.method
                                  else self.config.method)
        if id(options) not in self._methods:
            self._methods[id(options)] = configured(options)
        return self._methods[id(options)]

    def layer_plan(self, layer: LayerInfo, method: Method, budget: float,
                   size: int | None = None) -> LayerPlan:
        if size is None:
            floor = method.compact_numel(layer, method.min_size)
            size = method.size_for_budget(layer, max(budget, floor))
        if size is None:
            return LayerPlan(layer, method, None, float(layer.numel),
                             f"{method.name} saves nothing on this layer")
        return LayerPlan(layer, method, size, method.compact_numel(layer, size))


def plan_layers(layers: list[LayerInfo], skipped: list[SkippedLayer],
                config: CompressionConfig) -> Plan:
    """Return the plan for `layers` under `config`; a `ConfigError` if nothing can be targeted."""
    planner = _Planner(config)
    skipped = list(skipped)
    fixed: list[LayerPlan] = []  # sizes set by an override: they spend the global budget
    own_ratio: list[LayerPlan] = []  # ratios set by an override: their own budget
    free: list[tuple[LayerInfo, Method]] = []
    for override in config.overrides:
        if not any(fnmatch.fnmatchcase(layer.name, override.match) for layer in layers):
            names = ", ".join(layer.name for layer in layers) or "none"
            raise ConfigError(f"override {override.match!r} matches no compressible layer; "
                              f"the compressible layers are: {names}")
    for layer in layers:
        override = _override_for(layer.name, config.overrides)
        method = planner.method_for(override)
        reason = _exclusion(layer, method, override, config)
        if reason:
            skipped.append(SkippedLayer(layer.name, reason))
            continue
        if method.fixed_size is not None:
            fixed.append(planner.layer_plan(layer, method, 0, method.fixed_size))
        elif override and override.ratio is not None:
            own_ratio.append(planner.layer_plan(layer, method, override.ratio * layer.numel))
        else:
            free.append((layer, method))
    if not fixed and not own_ratio and not free:
        raise ConfigError(_nothing_targeted(layers, skipped))
    shared = config.ratio * (sum(layer.numel for layer, _ in free)
                             + sum(p.layer.numel for p in fixed))
    ratio, planned = _fit_ratio(planner, free, shared - sum(p.compact_numel for p in fixed))
    budget = shared + sum(p.compact_numel for p in own_ratio)
    by_name = {p.layer.name: p for p in fixed + own_ratio + planned}
    ordered = tuple(by_name[layer.name] for layer in layers if layer.name in by_name)
    return Plan(ordered, tuple(skipped), budget, ratio)


def _exclusion(layer: LayerInfo, method: Method, override: LayerOverride | None,
               config: CompressionConfig) -> str:
    if override is not None and override.skip:
        return f"skipped by override {override.match!r}"
    if not _matches(layer.name, config.layers.include) or _matches(layer.name, config.layers.exclude):
        return "not selected by layers.include / layers.exclude"
    if layer.kind not in method.layer_kinds:
        return f"method {method.name!r} does not apply to {layer.kind} layers"
    if layer.tied_embedding and "embedding" not in method.layer_kinds:
        return (f"its weight is also the input embedding table (tied), and method "
                f"{method.name!r} does not apply to embeddings")
    if layer.produces_output and method.ties_output_rows and not (override and override.method):
        return (f"{method.name} would make some of the model's outputs identical (this layer "
                "produces an output); name the method in an override to force it")
    if layer.numel < config.min_layer_params and override is None:
        return f"{layer.numel} weights < min_layer_params={config.min_layer_params}"
    return ""


def _fit_ratio(planner: _Planner, free: list[tuple[LayerInfo, Method]],
               budget: float) -> tuple[float, list[LayerPlan]]:
    """Return the largest per-layer ratio whose plan for `free` fits `budget`, and that plan."""
    def plan_at(ratio: float) -> list[LayerPlan]:
        return [replace(planner.layer_plan(layer, method, ratio * layer.numel), adjustable=True)
                for layer, method in free]

    def kept(plans: list[LayerPlan]) -> float:
        return sum(p.compact_numel for p in plans)

    if not free:
        return planner.config.ratio, []
    low, high = 0.0, 1.0
    best = plan_at(low)
    if kept(plan_at(high)) <= budget:
        return high, plan_at(high)
    for _ in range(40):
        mid = (low + high) / 2
        plans = plan_at(mid)
        if kept(plans) <= budget:
            low, best = mid, plans
        else:
            high = mid
    return low, best


def _nothing_targeted(layers: list[LayerInfo], skipped: list[SkippedLayer]) -> str:
    if not layers and not skipped:
        return (f"the model has no layer to compress; this service compresses {REWRITTEN_LAYERS}")
    reasons = "; ".join(f"{s.name}: {s.reason}" for s in skipped)
    return ("no layer is targeted by this config: " + reasons +
            ". Widen layers.include, lower min_layer_params, or pick a method that fits these layers")
