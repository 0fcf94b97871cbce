"""job.log is written as the job runs: each line can be read as soon as it is logged."""

from __future__ import annotations

import logging
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


def test_library_noise_in_a_job_goes_to_its_log_not_the_terminal(tmp_path: Path, capfd,
                                                                  monkeypatch) -> None:
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    shown: list[str] = []  # what the terminal would show
    monkeypatch.setattr(warnings, "showwarning", lambda message, *args: shown.append(str(message)))
    # another test (or a job's loading) may have quieted transformers' logger
    monkeypatch.setattr(logging.getLogger("transformers"), "level", logging.WARNING)
    monkeypatch.setattr(logging.getLogger("transformers.modeling_utils"), "level",
                        logging.NOTSET)
    log = JobLog(tmp_path / "job.log")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with log.capture_library_output():
            warnings.warn("isinstance(treespec, LeafSpec) is deprecated", FutureWarning,
                          stacklevel=1)
            logging.getLogger("torch.export").warning("a torch record")
            logging.getLogger("transformers.modeling_utils").warning("a transformers record")
            for _ in hf_logging.tqdm(range(3), desc="Writing model shards"):
                pass
        warnings.warn("said outside a job", UserWarning, stacklevel=1)
    log.close()
    text = (tmp_path / "job.log").read_text()
    assert "FutureWarning: isinstance(treespec, LeafSpec) is deprecated" in text
    assert text.count("torch.export warning: a torch record") == 1
    assert text.count("transformers.modeling_utils warning: a transformers record") == 1
    terminal = capfd.readouterr()
    assert not any(word in terminal.out + terminal.err
                   for word in ("LeafSpec", "record", "Writing model shards"))
    assert shown == ["said outside a job"]  # outside a job, nothing is hidden


def test_a_librarys_debug_and_info_records_stay_out_of_the_job_log(tmp_path):
    log = JobLog(tmp_path / "job.log")
    with log.capture_library_output():
        trace = logging.getLogger("torch.__trace")
        level = trace.level
        trace.setLevel(logging.DEBUG)  # as torch sets it, listened to or not
        try:
            trace.debug("a structured trace record")
        finally:
            trace.setLevel(level)
        logging.getLogger("transformers.modeling_utils").info("an info record")
        logging.getLogger("torch.export").warning("a torch warning")
    log.close()
    text = (tmp_path / "job.log").read_text()
    assert "a torch warning" in text
    assert "structured trace" not in text and "an info record" not in text


def test_a_librarys_line_is_logged_once_and_its_repeats_counted(tmp_path):
    import warnings

    log = JobLog(tmp_path / "job.log")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with log.capture_library_output():
            for _ in range(3):  # as the exporter warns on every export
                warnings.warn("The axis name: batch will not be used", UserWarning,
                              stacklevel=1)
                logging.getLogger("onnxscript.optimizer").warning("Evaluation failed")
            logging.getLogger("onnxscript.optimizer").warning("another record")
            log.info("the job's own line")
            log.info("the job's own line")  # the job's own lines are all kept
    log.close()
    lines = [line.split("] ", 1)[1] for line in (tmp_path / "job.log").read_text().splitlines()]
    assert sum("The axis name: batch will not be used" in line for line in lines) == 2
    assert lines.count("onnxscript.optimizer warning: Evaluation failed") == 1
    assert lines.count("onnxscript.optimizer warning: another record") == 1
    assert lines.count("the job's own line") == 2
    assert "came 2 more times, not logged again: onnxscript.optimizer warning: Evaluation failed" \
        in lines
    assert any(line.startswith("came 2 more times, not logged again: UserWarning: The axis "
                               "name: batch will not be used") for line in lines)
    assert not any(line.startswith("came 0") for line in lines)
