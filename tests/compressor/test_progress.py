"""Progress: one stage list, each stage a share of the job, in the order the pipeline runs."""

import pytest

from compressor.runtime import progress
from compressor.runtime.progress import overall_progress
from compressor.vocabulary import JOB_STAGES


def test_every_stage_of_the_vocabulary_has_a_share_and_the_shares_make_the_job():
    assert list(progress._STAGE_WEIGHTS) == list(JOB_STAGES)
    assert sum(progress._STAGE_WEIGHTS.values()) == pytest.approx(1.0)


def test_overall_progress_grows_through_the_stages_in_order():
    points = [overall_progress(stage, fraction) for stage in JOB_STAGES
              for fraction in (0.0, 0.5, 1.0)]
    assert points == sorted(points) and points[0] == 0.0 and points[-1] == pytest.approx(1.0)


def test_an_unknown_stage_is_refused_naming_the_stages():
    with pytest.raises(ValueError, match="calibrating"):
        overall_progress("polishing", 0.5)
