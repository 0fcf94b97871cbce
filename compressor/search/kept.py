"""Target mode's search kept for a retried job: the candidates it scored, the finalists that missed.

Scoring the candidates is minutes on a real model (each one initialized, corrected and scored,
the int8 ones exported and run in onnxruntime); fine-tuning a finalist, more. The search keeps
its outcome as soon as it has it: every candidate's figures (JSON; its plan is made again from
the kept sensitivities, along the same greedy path), from which the finalists' order follows as
it did, and each finalist that missed the floor after fine-tuning, with its figures. A retry
that finds them goes straight on to the first finalist not tried (whose fine-tuning checkpoint,
if any, is kept too); a finalist that missed is not fine-tuned again, and its checkpoint and θ
are dropped once the miss is kept (the disk holds one finalist's at a time).

Both are `compressor.runtime.resume.KeptRecord`s keyed by the job's inputs, every candidate's
plan and the held-out batch size, and discarded (logged) unless they check.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from compressor.plan.planning import Plan
from compressor.runtime.context import JobContext
from compressor.runtime.resume import KeptRecord

if TYPE_CHECKING:
    from compressor.search.candidates import Candidate

# The products a finalist's fine-tuning keeps (`compressor.finetune.checkpoints`,
# `compressor.rewrite.kept`): dropped once it missed.
_FINALIST_PRODUCTS = ("finetune-", "rewrite-")


class KeptSearch:
    """Where one search keeps its candidates and its finalists' misses (nowhere when the job
    keeps no products)."""

    def __init__(self, job: JobContext, plans: list[tuple[float, Plan]], dense: Plan,
                 shared: Plan, eval_batch: int) -> None:
        self.job = job
        self._plans = {fraction: plan for fraction, plan in plans}
        self._plans[1.0] = dense  # int8 of the original
        self._shared = shared  # the shared-values candidate's
        described = json.dumps({"plans": {str(f): p.to_dict() for f, p in self._plans.items()},
                                "shared": shared.to_dict(), "eval_batch": eval_batch},
                               sort_keys=True, default=str)
        slot = hashlib.sha256(described.encode()).hexdigest()[:16]
        self._candidates = self._misses = None
        if job.resume is not None:
            self._candidates = KeptRecord(job.resume, f"search-{slot}", (described,),
                                          "target: the scored candidates", job.log.info)
            self._misses = KeptRecord(job.resume, f"search-tries-{slot}", (described,),
                                      "target: the finalists tried", job.log.info)
        self.missed: list[dict[str, Any]] = self._load_misses()

    def candidates(self, make: Callable[..., Candidate]) -> list[Candidate] | None:
        """Return the candidates an earlier try scored (made by `make`, with their plans), or
        None when none are kept."""
        kept = None if self._candidates is None else self._candidates.load()
        if kept is None:
            return None
        try:
            candidates = [make(**{k: v for k, v in entry.items() if k != "dense_exports"},
                               plan=self._plan_of(entry))
                          for entry in kept]
        except (KeyError, TypeError) as exc:
            self.job.log.info(f"target: the kept candidates discarded: they do not fit this "
                              f"search ({exc!r}); scored again")
            self._candidates.delete()
            return None
        self.job.log.info(f"target: reused the {len(candidates)} candidates an earlier try "
                          "scored (none is scored again)")
        self.job.reused(f"the search's {len(candidates)} scored candidates")
        return candidates

    def _plan_of(self, entry: dict[str, Any]) -> Plan:
        """Return the plan of a kept candidate, with the layers it was exported dense."""
        plan = (self._shared if entry.get("method") == "share_values"
                else self._plans[entry["kept_fraction"]])
        return replace(plan, dense_exports=frozenset(entry.get("dense_exports", ())))

    def save_candidates(self, candidates: list[Candidate]) -> None:
        """Keep every candidate's figures."""
        if self._candidates is not None:
            self._candidates.save([c.summary() for c in candidates])

    def _load_misses(self) -> list[dict[str, Any]]:
        kept = None if self._misses is None else self._misses.load()
        return list(kept) if isinstance(kept, list) else []

    def missed_before(self, candidate: Candidate) -> dict[str, Any] | None:
        """Return what an earlier try's fine-tuning of `candidate` reached, when it missed."""
        for tried in self.missed:
            if (tried.get("kept_fraction"), tried.get("quantize"),
                    tried.get("unsmoothed", False), tried.get("method", "lowrank")) == (
                    candidate.kept_fraction, candidate.quantize, candidate.unsmoothed,
                    candidate.method):
                self.job.reused(f"the fine-tuned finalist kept {candidate.kept_fraction:g}"
                                f"{' int8' if candidate.quantize else ''} (it missed)")
                return tried
        return None

    def keep_miss(self, tried: dict[str, Any]) -> None:
        """Keep that a finalist missed after fine-tuning; drop its checkpoint and θ."""
        self.missed.append(tried)
        if self._misses is None:
            return
        self._misses.save(self.missed)
        for product in self.job.resume.path.glob("*"):
            if product.name.startswith(_FINALIST_PRODUCTS):
                self.job.resume.delete_product(product)
