"""`nemo_tst.demo.runs`: runs side by side, a run's deadline and stop, a finished run."""

import io
import threading
import time

import pytest

from nemo_tst.core import run_dir
from nemo_tst.demo.progress import Progress
from nemo_tst.demo.runs import OutOfTime, finished, side_by_side, train
from nemo_tst.errors import RunFailed
from nemo_tst.recipes import load_recipe


def test_a_failed_run_leaves_the_others_running():
    ended = []

    def job(name):
        if name == "broken":
            raise RunFailed("broken: no data")
        if name == "buggy":
            raise KeyError("an internal invariant broke")
        time.sleep(0.2)  # still running when the broken run has failed
        ended.append(name)
        return name.upper()

    with pytest.raises(RunFailed, match=r"^broken: no data$"):
        side_by_side(job, ["broken", "a", "b"], workers=2)
    assert sorted(ended) == ["a", "b"]
    assert side_by_side(job, ["a", "b"], workers=1) == {"a": "A", "b": "B"}
    with pytest.raises(KeyError, match="an internal invariant broke"):  # a bug, as it is
        side_by_side(job, ["broken", "buggy"], workers=2)


def _progress(name):
    return Progress({name: {}}, stream=io.StringIO(), tty=False)


def test_no_phase_starts_after_the_deadline_or_a_stop(tmp_path):
    argv = load_recipe("tst_tiny", overrides=[f"run_dir={tmp_path / 'run'}"]).megatron_args()
    log = tmp_path / "tst.log"
    progress = _progress("tst")
    with pytest.raises(OutOfTime, match="out of time before phase 1"):
        train("tst", argv, log_file=log, progress=progress, deadline=time.time() + 59)
    assert progress.state["tst"]["status"] == "FAILED"
    stop = threading.Event()
    stop.set()
    with pytest.raises(OutOfTime, match="stopped before its start"):
        train("tst", argv, log_file=log, progress=progress, stop=stop)
    assert not log.exists() and not (tmp_path / "run").exists()  # nothing was launched


def test_finished_is_phase_2_at_the_last_iteration(tmp_path):
    assert not finished(tmp_path, 30)
    phase2 = run_dir.RunDirectory(tmp_path).phase_dir(2)
    phase2.mkdir()
    (phase2 / run_dir.MEGATRON_TRACKER).write_text("20")
    assert not finished(tmp_path, 30)
    (phase2 / run_dir.MEGATRON_TRACKER).write_text("30")
    assert finished(tmp_path, 30)
