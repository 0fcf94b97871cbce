"""job.log is written as the job runs: each line can be read as soon as it is logged."""

from __future__ import annotations

from pathlib import Path

from compressor.runtime.joblog import JobLog


def test_each_line_is_readable_before_the_log_closes(tmp_path: Path) -> None:
    log = JobLog(tmp_path / "job.log")
    assert (tmp_path / "job.log").read_text() == ""
    log.info("first")
    assert (tmp_path / "job.log").read_text().endswith("] first\n")
    with log.stage("loading"):
        assert "stage loading: started" in (tmp_path / "job.log").read_text()
    log.close()
    log.close()
    log.info("after close goes to the logger only")
    lines = (tmp_path / "job.log").read_text().splitlines()
    assert [line.split("] ", 1)[1] for line in lines][:2] == ["first", "stage loading: started"]
    assert lines[-1].split("] ", 1)[1].startswith("stage loading: ")
    assert set(log.stage_seconds) == {"loading"}
