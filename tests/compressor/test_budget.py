"""The job's time budget: what is left, what a stage may spend, what it cut."""

import math

import pytest

from compressor.runtime.budget import TimeBudget, finishing_reserve_s
from compressor.runtime.costs import MIN_SAMPLES, SampleCosts
from compressor.runtime.progress import JobControl


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def test_without_a_budget_everything_is_affordable_and_nothing_is_cut():
    clock = Clock()
    budget = TimeBudget(None, clock)
    clock.now += 10**9
    assert not budget.limited and budget.left_s() == math.inf and budget.affords(10**12)
    assert budget.summary() == {"max_minutes": None, "elapsed_s": 10**9, "reserve_s": 0.0,
                                "cut": []}


def test_time_kept_for_a_block_is_given_back_after_it_even_when_it_fails():
    clock = Clock()
    budget = TimeBudget(2, clock)
    budget.reserve_s = 30
    with budget.keeping(45):
        assert budget.reserve_s == 75 and budget.affords(45) and not budget.affords(46)
    assert budget.reserve_s == 30
    with pytest.raises(RuntimeError), budget.keeping(10):
        raise RuntimeError("a finalist's fine-tuning failed")
    assert budget.reserve_s == 30
    # the finishing reserve growing meanwhile (a candidate's export measured) keeps both
    with budget.keeping(45):
        assert budget.reserve_at_least(60) and budget.reserve_s == 105
        assert not budget.reserve_at_least(50)
    assert budget.reserve_s == 60


def test_a_budget_keeps_its_reserve_for_what_follows():
    clock = Clock()
    budget = TimeBudget(2, clock)
    budget.reserve_s = 30
    clock.now += 60
    assert budget.left_s() == 60
    assert budget.affords(30) and not budget.affords(31)
    clock.now += 90  # overspent: nothing more is affordable
    assert budget.left_s() == -30 and not budget.affords(0)
    assert budget.describe() == "max_minutes 2 (0 s left)"
    budget.cut("fine-tuning stopped at step 3 of 9")
    assert budget.summary()["cut"] == ["fine-tuning stopped at step 3 of 9"]


def test_the_reserve_grows_with_the_model_and_the_reports_latency_figures():
    small, large = finishing_reserve_s(10**6, 0), finishing_reserve_s(4 * 2**30, 0)
    assert 60 <= small < large and finishing_reserve_s(10**6, 1.0) > small


@pytest.mark.parametrize(("seconds", "per_sample", "wanted", "taken"), [
    (1000, 0.001, 512, 512),  # plenty of time: every sample wanted
    (100, 0.25, 512, 50),  # a quarter of 100 s, two passes of 0.25 s a sample
    (0, 0.25, 512, MIN_SAMPLES),  # nothing left: the fewest calibration runs on
    (-5, 0.25, 4, 4),  # never more than wanted
])
def test_calibration_takes_what_its_share_of_the_budget_affords(seconds, per_sample, wanted,
                                                                taken):
    assert SampleCosts.calibration_samples_in(seconds, per_sample, wanted) == taken


def test_the_timeout_and_the_budget_run_on_one_clock(monkeypatch):
    from compressor.errors import JobTimeoutError
    from compressor.runtime import progress as progress_module

    clock = Clock()
    monkeypatch.setattr(progress_module, "monotonic", clock)
    control = JobControl(timeout_s=120, max_minutes=1)
    clock.now += 90
    assert control.budget.left_s() == -30
    control.check()  # past the budget is not a failure
    clock.now += 31
    with pytest.raises(JobTimeoutError, match="max_minutes"):
        control.check()
