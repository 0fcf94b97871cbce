"""The planning and calibrating stages: which layers to rewrite, with which method and size.

Planning finds the program's layers and fits the config's budget with one ratio for all
(`planning`); calibrating runs the original over calibration samples, lets each method prepare
what its layers need (`calibration`), and, by default, spreads the budget by each layer's
sensitivity (`allocation`).
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
    """The plan, and the calibration statistics its layers' initialization reads (each entry
    is consumed by the rewriting stage as its layer is initialized)."""

    plan: Plan
    stats: dict[str, LayerStats]


def plan(loaded: LoadedJob, config: CompressionConfig, job: JobContext) -> PlannedJob:
    """Plan the job's layers and calibrate them."""
    with job.log.stage(PLANNING):
        job.control.report(PLANNING, 0.0)
        planned = plan_layers(*find_layers(loaded.teacher), config)
    with job.log.stage(CALIBRATING):
        stats = calibrate(loaded.teacher, planned, loaded.train, job)
        if config.allocation == "sensitivity":
            job.control.report(CALIBRATING, 0.9, "measuring each layer's sensitivity")
            planned = allocate(loaded.teacher, planned, stats, loaded.train, loaded.kinds, job)
        job.log.info(f"plan ({planned.allocation}): {len(planned.compressed)} layers compressed, "
                     f"kept {planned.kept_numel / max(1, planned.targeted_numel):.3f} of "
                     "targeted weights")
    return PlannedJob(planned, stats)
