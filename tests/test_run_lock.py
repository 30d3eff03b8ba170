"""The run lock where `flock` is unsupported (Lustre without the `flock` mount option, some NFS
and FUSE mounts): `flock` raises ENOSYS / EOPNOTSUPP / ENOLCK there, and the lock falls back to
an exclusively created DIR/tst_run.lock.held naming its holder."""

import errno
import fcntl
import json
import os
import socket
import subprocess
import sys

import pytest

from nemo_tst.core.run_dir import LOCK, LOCK_FILE, RunDirectory
from nemo_tst.core.run_lock import RunLock
from nemo_tst.training.arguments import MEGATRON_NAMES

UNSUPPORTED = ["ENOSYS", "EOPNOTSUPP", "ENOLCK"]


def _flock_raising(code):
    def flock(fd, operation):
        raise OSError(code, os.strerror(code))
    return flock


@pytest.fixture
def said():
    lines = []
    return lines


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_without_flock_one_run_per_directory_is_kept_by_a_lock_file(monkeypatch, tmp_path, said, name):
    monkeypatch.setattr(fcntl, "flock", _flock_raising(getattr(errno, name)))
    run = tmp_path / "run"
    first = RunLock(run, say=said.append).acquire(MEGATRON_NAMES)
    # One warning line: flock is unsupported there, and what is used instead.
    assert len(said) == 1 and "\n" not in said[0]
    assert "does not support flock" in said[0] and errno.errorcode[getattr(errno, name)] in said[0] and str(run / LOCK_FILE) in said[0]
    held = json.loads((run / LOCK_FILE).read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["since"]
    # A second run on the same directory (this process is alive) refuses, naming the holder.
    with pytest.raises(ValueError) as refused:
        RunLock(run, say=said.append).acquire(MEGATRON_NAMES)
    message = str(refused.value)
    assert "\n" not in message
    assert f"--save {run} is in use by another run (pid {os.getpid()} on host {socket.gethostname()}, since" in message
    assert (run / LOCK_FILE).is_file()  # the refusal took nothing away
    # The directory stays a TST run directory to claim (the lock comes before the claim).
    RunDirectory(run).check({}, MEGATRON_NAMES)
    first.release()
    assert not (run / LOCK_FILE).exists()
    with RunLock(run, say=said.append).acquire(MEGATRON_NAMES):
        assert (run / LOCK_FILE).is_file()
    assert not (run / LOCK_FILE).exists()


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_stale_lock_file_of_a_dead_process_on_this_host_is_taken_over(monkeypatch, tmp_path, said):
    monkeypatch.setattr(fcntl, "flock", _flock_raising(errno.ENOSYS))
    run = tmp_path / "run"
    run.mkdir()
    dead = _dead_pid()
    (run / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead, "since": "then"}))
    lock = RunLock(run, say=said.append).acquire(MEGATRON_NAMES)
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert any(f"took over the lock file {run / LOCK_FILE} of pid {dead}" in line for line in said)
    assert sorted(p.name for p in run.iterdir()) == sorted([LOCK, LOCK_FILE])  # nothing left aside
    lock.release()
    assert not (run / LOCK_FILE).exists()


def test_a_lock_file_of_another_host_refuses_naming_the_file_to_remove(monkeypatch, tmp_path, said):
    monkeypatch.setattr(fcntl, "flock", _flock_raising(errno.EOPNOTSUPP))
    run = tmp_path / "run"
    run.mkdir()
    text = json.dumps({"host": "node-other-17", "pid": 4242, "since": "2026-01-01 00:00:00 UTC"})
    (run / LOCK_FILE).write_text(text)
    with pytest.raises(ValueError) as refused:
        RunLock(run, say=said.append).acquire(MEGATRON_NAMES)
    message = str(refused.value)
    assert "\n" not in message
    assert "in use by another run (pid 4242 on host node-other-17, since 2026-01-01 00:00:00 UTC)" in message
    assert f"remove {run / LOCK_FILE} and rerun" in message
    assert (run / LOCK_FILE).read_text() == text  # left as it was


def test_a_live_holder_on_this_host_is_not_taken_over(monkeypatch, tmp_path, said):
    monkeypatch.setattr(fcntl, "flock", _flock_raising(errno.ENOLCK))
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "since": "now"}))
        with pytest.raises(ValueError, match=f"pid {holder.pid} on host"):
            RunLock(run, say=said.append).acquire(MEGATRON_NAMES)
    finally:
        holder.kill()
        holder.wait()
    RunLock(run, say=said.append).acquire(MEGATRON_NAMES).release()  # gone now: taken over


def test_other_flock_errors_are_not_hidden(monkeypatch, tmp_path):
    monkeypatch.setattr(fcntl, "flock", _flock_raising(errno.EIO))
    with pytest.raises(OSError) as err:
        RunLock(tmp_path / "run").acquire(MEGATRON_NAMES)
    assert err.value.errno == errno.EIO
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_with_flock_no_lock_file_is_made(tmp_path, said):
    run = tmp_path / "run"
    with RunLock(run, say=said.append).acquire(MEGATRON_NAMES):
        assert not (run / LOCK_FILE).exists() and said == []
        with pytest.raises(ValueError, match="is in use by another run"):
            RunLock(run).acquire(MEGATRON_NAMES)
