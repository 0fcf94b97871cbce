"""Target mode's search as a report gives it, for tests that compare two jobs' searches."""

from typing import Any


def unmeasured(search: dict[str, Any]) -> dict[str, Any]:
    """Return `search` (a report's `target`) with every candidate's latency left out: timing
    is measured, not computed, so two jobs' candidates agree on everything else only."""
    def plain(candidate: dict[str, Any]) -> dict[str, Any]:
        return {**candidate, "latency_ms": None}

    return {**search, "chosen": plain(search["chosen"]),
            "candidates": [plain(c) for c in search["candidates"]]}
