"""The calibrating and planning stages: which layers to rewrite, with which method and size.

Calibrating finds the program's layers, fits the config's budget with one ratio for all
(`planning.plan_layers`), runs the original over calibration samples and lets each method
prepare what its layers need (`calibration`). Planning then spreads the budget by each layer's
sensitivity (`allocation`), by default; in target mode the search plans instead
(`compressor.search`).
"""

from __future__ import annotations

from dataclasses import dataclass

from compressor.config import CompressionConfig
from compressor.load.stage import LoadedJob
from compressor.plan.allocation import allocate
from compressor.plan.calibration import calibrate
from compressor.plan.layers import find_layers
from compressor.plan.planning import Plan, plan_layers
from compressor.runtime.context import JobContext
from compressor.runtime.layers import LayerStats
from compressor.vocabulary import CALIBRATING, PLANNING


@dataclass
class PlannedJob:
    """A plan, and the calibration statistics its layers' initialization reads (each entry is
    consumed by the rewriting stage as its layer is initialized)."""

    plan: Plan
    stats: dict[str, LayerStats]


def calibrate_layers(loaded: LoadedJob, config: CompressionConfig,
                     job: JobContext) -> PlannedJob:
    """Find the layers, plan them with one ratio for all, and calibrate them."""
    with job.log.stage(CALIBRATING):
        job.control.report(CALIBRATING, 0.0)
        uniform = plan_layers(*find_layers(loaded.teacher), config)
        stats = calibrate(loaded.teacher, uniform, loaded.train, job)
    return PlannedJob(uniform, stats)


def plan(loaded: LoadedJob, calibrated: PlannedJob, config: CompressionConfig,
         job: JobContext) -> PlannedJob:
    """Return the calibrated plan with its sizes spread by sensitivity (unless the config
    asks for a uniform allocation)."""
    with job.log.stage(PLANNING):
        planned = calibrated.plan
        if config.allocation == "sensitivity":
            job.control.report(PLANNING, 0.0, "measuring each layer's sensitivity")
            planned = allocate(loaded.teacher, planned, calibrated.stats, loaded.train,
                               loaded.kinds, job)
        job.log.info(f"plan ({planned.allocation}): {len(planned.compressed)} layers compressed, "
                     f"kept {planned.kept_numel / max(1, planned.targeted_numel):.3f} of "
                     "targeted weights")
    return PlannedJob(planned, calibrated.stats)
