"""One run per directory: the lock a run holds on its run directory (`RunLock`).

Where the lock files lie is the run directory's business (`RunDirectory.lock`,
`RunDirectory.lock_file`); this module only takes and releases them.
"""

import errno
import json
import os
import sys
from pathlib import Path
from typing import Optional

from nemo_tst.core.run_dir import RunDirectory
from nemo_tst.core.settings import SettingNames

__all__ = ["LOCK_HELD_ENV", "RunLock"]

LOCK_HELD_ENV = "NEMO_TST_RUN_LOCK_HELD"
"""Set (to the run directory) in the environment of ranks whose launcher holds the lock."""
FLOCK_UNSUPPORTED = frozenset(
    getattr(errno, name) for name in ("ENOSYS", "EOPNOTSUPP", "ENOTSUP", "ENOLCK") if hasattr(errno, name)
)
"""What `flock` raises on a file system without lock support (Lustre mounted without
`flock`, some NFS and FUSE mounts)."""


class RunLock:
    """One run per directory: an exclusive `flock` on the run directory's lock file
    (`RunDirectory.lock`), which the operating system releases when the holding process ends,
    however it ends (a crash, SIGKILL, a preempted node), so a stale lock never blocks a rerun. The file says who holds it (host,
    pid, since when) for the refusal a second run prints.

    `nemo-tst pretrain` takes it before the first write to DIR and holds it over all its
    launches; its ranks inherit `LOCK_HELD_ENV` and take none. Launched without it (NeMo-Run
    and Slurm stages start every rank with `python -m nemo_tst.training.pretrain`), global
    rank 0 of each stage takes it for its lifetime, so a second submission of the same run
    refuses while a stage trains.

    Where the file system has no `flock` (it raises ENOSYS, EOPNOTSUPP or ENOLCK: Lustre
    without the `flock` mount option, some NFS and FUSE mounts), the lock is the exclusive
    creation of `RunDirectory.lock_file` naming the holder (host, pid, since when), removed on
    release, and one warning line says so (`say`). Nobody removes that file for a holder that
    dies without releasing: a rerun on the same host takes it over once its process is gone;
    a run on another host refuses, naming the file to remove if no run holds it."""

    def __init__(self, run_dir, say=None):
        layout = RunDirectory(run_dir)
        self.root = layout.root
        self.path = layout.lock
        self.file = layout.lock_file
        self._fd = None
        self._own_file = None  # the content of the lock file while this object holds it
        self._say = say or (lambda text: print(text, file=sys.stderr, flush=True))

    @staticmethod
    def _describe(info: dict) -> str:
        if not info:
            return "an unknown process"
        return f"pid {info.get('pid')} on host {info.get('host')}, since {info.get('since')}"

    def holder(self) -> str:
        return self._describe(_read_json(self.path))

    def _in_use(self, names: SettingNames, who: str, extra: str = "") -> ValueError:
        return ValueError(
            f"{names.run_dir} {self.root} is in use by another run ({who}): one run per "
            f"directory; wait for it to finish (or stop it), or choose another {names.run_dir}{extra}"
        )

    def acquire(self, names: SettingNames) -> "RunLock":
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._in_use(names, self.holder()) from None
        except OSError as err:
            os.close(fd)
            if err.errno not in FLOCK_UNSUPPORTED:
                raise
            self._say(
                f"[nemo-tst] WARNING: the file system of {self.root} does not support flock "
                f"({errno.errorcode.get(err.errno, err.errno)}); one run per directory is kept by "
                f"the lock file {self.file} instead, removed when the run ends (for a lock the "
                f"file system enforces, mount it with flock support, e.g. Lustre's `flock` option)"
            )
            return self._acquire_file(names)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder_info()).encode(), 0)
        self._fd = fd
        return self

    def _acquire_file(self, names: SettingNames) -> "RunLock":
        """The lock without flock: create the lock file exclusively; take over one whose holder
        is a dead process of this host."""
        import socket

        for _ in range(3):
            info = _holder_info()
            text = json.dumps(info)
            try:
                fd = os.open(self.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pass
            else:
                try:
                    os.write(fd, text.encode())
                    os.fsync(fd)
                finally:
                    os.close(fd)
                self._own_file = text
                return self
            try:
                found_text = self.file.read_text()
            except FileNotFoundError:
                continue  # released meanwhile: try again
            found = _read_json(self.file, found_text)
            remove = (f"; if no run holds it (its process or node is gone), remove {self.file} "
                      f"and rerun")
            if found.get("host") != socket.gethostname() or not isinstance(found.get("pid"), int):
                raise self._in_use(names, self._describe(found), remove)
            if _process_alive(found["pid"]):
                raise self._in_use(names, self._describe(found))
            # Stale: its holder was a process of this host that is gone. Move it aside (atomic:
            # of two takers one succeeds), and check that what moved is what was judged stale.
            aside = self.file.with_name(f"{self.file.name}.stale.{os.getpid()}")
            try:
                os.rename(self.file, aside)
            except FileNotFoundError:
                continue
            if aside.read_text() != found_text:  # another run took it over meanwhile: put it back
                os.rename(aside, self.file)
                raise self._in_use(names, self._describe(_read_json(aside)))
            aside.unlink()
            self._say(f"[nemo-tst] took over the lock file {self.file} of {self._describe(found)}, "
                      f"a process that is gone")
        raise self._in_use(names, self._describe(_read_json(self.file)), "")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
        if self._own_file is not None:
            try:
                if self.file.read_text() == self._own_file:
                    self.file.unlink()
            except FileNotFoundError:
                pass
            self._own_file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _holder_info() -> dict:
    import socket
    import time

    return {"host": socket.gethostname(), "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _read_json(path: Path, text: Optional[str] = None) -> dict:
    try:
        info = json.loads((path.read_text() if text is None else text) or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _process_alive(pid: int) -> bool:
    """Whether process `pid` of this host exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    return True
