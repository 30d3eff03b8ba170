"""A TST run directory: which phase, which iteration, load from where. Both adapters read it.

    DIR/tst_run.json   what was trained here: the TST settings, the plan, the model shape
    DIR/phase1/        phase 1 saves here; it ends with the checkpoint of iteration n1
    DIR/phase2/        phase 2 loads DIR/phase1 the first time, then itself; saves here

Phase 2 never writes into phase 1's directory, so the handoff checkpoint is never overwritten
or deleted. Each phase directory is an ordinary Megatron checkpoint directory, whose tracker
the trainer writes only once a save is complete: an interrupted save is never the latest.

With s = 1 there is no phase 1 (`run_phases`): the whole run is phase 2, iterations 1..N,
saved in and resumed from DIR/phase2. A directory from the earlier two-launch layout (a
phase-1 checkpoint, no phase 2 yet) resumes from its phase-1 checkpoint in that one launch:
at s = 1 both phases are ordinary next-token steps over the same samples.
"""

import errno
import json
import os
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import Optional

from nemo_tst.core.plan import TSTPlan, run_phases
from nemo_tst.core.settings import SettingNames, TSTSettings

__all__ = [
    "BRIDGE_TRACKER", "LOCK", "LOCK_FILE", "LOCK_HELD_ENV", "MANIFEST", "MEGATRON_TRACKER", "RunLock",
    "check_run_directory", "checkpoint_problem", "checkpoint_progress", "claim_run_directory",
    "damaged_checkpoint_fallbacks", "fall_back", "has_checkpoints", "latest_iteration",
    "phase2_source", "phase_dir", "phase_start", "phases_to_run", "settings_identity",
    "usable_checkpoint",
]

MANIFEST = "tst_run.json"
MEGATRON_TRACKER = "latest_checkpointed_iteration.txt"
"""Megatron-LM's tracker ("release" or the iteration); Bridge writes it too."""
BRIDGE_TRACKER = "latest_train_state.pt"
"""Megatron-Bridge's tracker: its TrainState.state_dict(), {"step": tensor, ...}."""


def phase_dir(run_dir, phase: int) -> Path:
    return Path(run_dir) / f"phase{phase}"


def latest_iteration(checkpoint_dir) -> Optional[int]:
    """The iteration of the last complete checkpoint in a Megatron or Bridge save directory,
    or None. Bridge's tracker first, else Megatron-LM's ("release" counts as 0)."""
    path = Path(checkpoint_dir)
    if (path / BRIDGE_TRACKER).is_file():
        import torch

        return int(torch.load(path / BRIDGE_TRACKER, map_location="cpu", weights_only=True)["step"])
    tracker = path / MEGATRON_TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text(errors="replace").strip()
    if text == "release":
        return 0
    if not text.isdigit():
        raise ValueError(f"{tracker} holds {text[:40]!r}, not an iteration")
    return int(text)


def checkpoint_progress(run_dir, plan: TSTPlan, names: SettingNames) -> tuple[Optional[int], Optional[int]]:
    """(phase 1's, phase 2's) latest complete iteration, after checking they belong to `plan`."""
    N, n1 = plan.train_iters, plan.phase1_iters
    p1_dir, p2_dir = phase_dir(run_dir, 1), phase_dir(run_dir, 2)
    p1, p2 = _tracked(p1_dir)[0], _tracked(p2_dir)[0]  # an unreadable tracker: a damaged checkpoint
    for where, it in ((p1_dir, p1), (p2_dir, p2)):
        if it is not None and it > N:
            raise ValueError(
                f"{where} holds a checkpoint of iteration {it}, past the plan's end "
                f"({names.train_iters}={N}): it belongs to another run; choose a new "
                f"{names.run_dir}"
            )
    if p1 is not None and p1 > n1 and 1 in run_phases(plan):
        raise ValueError(
            f"{p1_dir} holds iteration {p1} but phase 1 ends at {n1}: the phase-1 length "
            f"changed since this run started; rerun with the original {names.phase1_fraction} / "
            f"{names.phase1_iters} and {names.train_iters}"
        )
    return p1, p2


def phases_to_run(run_dir, plan: TSTPlan, names: SettingNames, wanted=(1, 2)) -> list[int]:
    """The phases of `wanted` still to run, in order, judged from the checkpoints on disk.

    Phase 1 is done once phase 1 holds iteration n1 (or phase 2 has started); phase 2 once it
    holds N. Asked for phase 2 alone before phase 1's handoff exists, refuses."""
    N, n1 = plan.train_iters, plan.phase1_iters
    p1, p2 = checkpoint_progress(run_dir, plan, names)
    wanted = [p for p in wanted if p in run_phases(plan)]
    todo = []
    if 1 in wanted and p2 is None and (p1 or 0) < n1:
        todo.append(1)
    if 2 in wanted and (p2 or 0) < N:
        if 1 not in wanted and 1 in run_phases(plan) and p2 is None and p1 != n1:
            raise ValueError(
                f"phase 2 needs phase 1's checkpoint of iteration {n1} in {phase_dir(run_dir, 1)}, "
                f"found {'none' if p1 is None else f'iteration {p1}'}; run phase 1 first"
            )
        todo.append(2)
    return todo


def phase2_source(plan: TSTPlan, own: Path, handoff: Path) -> Path:
    """Where phase 2 loads from, judged from what is on disk now, without checks: its own
    directory once it holds a checkpoint; before that phase 1's handoff (at s = 1 only when an
    earlier two-launch run left a checkpoint there, else its own, empty directory)."""
    if latest_iteration(own) is not None:
        return own
    if 1 in run_phases(plan) or latest_iteration(handoff) is not None:
        return handoff
    return own


def phase_start(plan: TSTPlan, phase: int, own: Path, handoff: Optional[Path]) -> tuple[Optional[Path], Optional[str]]:
    """Where a phase's launch loads from: (directory, None), or (None, why there is nothing to
    do). `own` is the phase's save directory, `handoff` phase 1's (for phase 2).

    Phase 1 and a started phase 2 resume from their own directory. Phase 2's first start
    loads phase 1's checkpoint of iteration n1, and refuses without it; at s = 1 it starts
    from iteration 0 (its own, empty directory), or from the two-launch layout's phase 1."""
    n1, N = plan.phase1_iters, plan.train_iters
    single = 1 not in run_phases(plan)
    done = latest_iteration(own)
    if phase == 1:
        if single:
            return None, "there is no superposition phase at s = 1: nothing to do for phase 1"
        if done is not None and done >= n1:
            return None, f"phase 1 is complete (iteration {done} in {own}); nothing to do"
        return own, None
    if done is not None:
        if done >= N:
            return None, f"phase 2 is complete (iteration {done} in {own}); nothing to do"
        return own, None
    if handoff is None:
        return own, None  # the caller chose what phase 2 loads
    if single:
        return phase2_source(plan, own, handoff), None
    got = latest_iteration(handoff)
    if got != n1:
        raise ValueError(
            f"phase 2 starts from phase 1's checkpoint of iteration {n1} in {handoff}, found "
            f"{'none' if got is None else f'iteration {got}'}: run phase 1 to its end first"
        )
    return handoff, None


def settings_identity(settings: TSTSettings, plan: TSTPlan) -> dict:
    """What the TST settings fix about a run directory: every setting that changes what is
    trained, under its `tst_` name, with phase 1's length as iterations (r and n1 are two
    spellings of it)."""
    ident = {f"tst_{f.name}": getattr(settings, f.name) for f in fields(settings)
             if f.name not in ("phase1_fraction", "phase1_iters")}
    ident["phase1_iters"] = plan.phase1_iters
    return _as_json(ident)


def _as_json(value):
    """`value` as the manifest holds it after a JSON round trip (tuples as lists, other
    objects as their str)."""
    return json.loads(json.dumps(value, default=str))


_IDENTITY_DEFAULTS = {f"tst_{f.name}": f.default for f in fields(TSTSettings)}


def has_checkpoints(run_dir) -> bool:
    """Whether any phase directory of the run holds a checkpoint (complete or not)."""
    for phase in (1, 2):
        directory = phase_dir(run_dir, phase)
        if _saved_iterations(directory) or (directory / MEGATRON_TRACKER).exists() or (directory / BRIDGE_TRACKER).exists():
            return True
    return False


def check_run_directory(run_dir, identity: dict, names: SettingNames) -> None:
    """Refuse a directory that holds another run, or files that are no TST run's. Read-only.

    `identity`: every setting that fixes what the directory holds (the adapter adds the model
    shape to `settings_identity`). A setting the manifest lacks (written by an earlier
    nemo-tst) counts as its default. A manifest left by a start that never saved a checkpoint
    (a failed first launch) does not pin its settings: the corrected command claims the
    directory anew."""
    root = Path(run_dir)
    manifest = root / MANIFEST
    identity = _as_json(identity)
    if manifest.is_file():
        try:
            previous = json.loads(manifest.read_text())["identity"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"{manifest} cannot be read ({type(err).__name__}: {err}); restore it, or choose "
                f"a new {names.run_dir} directory"
            ) from None
        before = {k: previous.get(k, _IDENTITY_DEFAULTS.get(k)) for k in identity}
        diff = {k: (before[k], v) for k, v in identity.items() if before[k] != v}
        if diff and has_checkpoints(root):
            details = ", ".join(f"{k}: {a!r} there vs {b!r} now" for k, (a, b) in diff.items())
            raise ValueError(
                f"{names.run_dir} {root} holds a different TST run ({details}); choose a new "
                f"{names.run_dir} directory, or rerun with the original settings to resume it"
            )
        return
    ours = {LOCK, LOCK_FILE, "train.log"}
    if root.exists() and not root.is_dir():
        raise ValueError(f"{names.run_dir} {root} is a file, not a directory; choose a directory")
    if root.exists() and any(p.name not in ours for p in root.iterdir()):
        raise ValueError(
            f"{names.run_dir} {root} is not empty and holds no {MANIFEST}: it is not a TST run "
            f"directory; choose a new or empty {names.run_dir} directory"
        )


def claim_run_directory(run_dir, identity: dict, plan: TSTPlan, names: SettingNames) -> None:
    """Record the run in DIR/tst_run.json (after `check_run_directory`, which it repeats):
    written to a temporary file and renamed, so the manifest is never half written. Call it
    holding the `RunLock`, once every check has passed: it is the run's first write."""
    import os

    check_run_directory(run_dir, identity, names)
    root = Path(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    record = {"identity": _as_json(identity),
              "plan": asdict(plan) | {"superposition": asdict(plan.superposition)}}
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, root / MANIFEST)


# --------------------------------------------------------------------------------------------
# One run per directory
# --------------------------------------------------------------------------------------------

LOCK = "tst_run.lock"
LOCK_HELD_ENV = "NEMO_TST_RUN_LOCK_HELD"
"""Set (to the run directory) in the environment of ranks whose launcher holds the lock."""
LOCK_FILE = "tst_run.lock.held"
"""Where `flock` is unsupported: exists while a run holds the directory (who, where, since)."""
FLOCK_UNSUPPORTED = frozenset(
    getattr(errno, name) for name in ("ENOSYS", "EOPNOTSUPP", "ENOTSUP", "ENOLCK") if hasattr(errno, name)
)
"""What `flock` raises on a file system without lock support (Lustre mounted without
`flock`, some NFS and FUSE mounts)."""


class RunLock:
    """One run per directory: an exclusive `flock` on DIR/tst_run.lock, which the operating
    system releases when the holding process ends, however it ends (a crash, SIGKILL, a
    preempted node), so a stale lock never blocks a rerun. The file says who holds it (host,
    pid, since when) for the refusal a second run prints.

    `nemo-tst pretrain` takes it before the first write to DIR and holds it over all its
    launches; its ranks inherit `LOCK_HELD_ENV` and take none. Launched without it (NeMo-Run
    and Slurm stages start every rank with `python -m nemo_tst.training.pretrain`), global
    rank 0 of each stage takes it for its lifetime, so a second submission of the same run
    refuses while a stage trains.

    Where the file system has no `flock` (it raises ENOSYS, EOPNOTSUPP or ENOLCK: Lustre
    without the `flock` mount option, some NFS and FUSE mounts), the lock is the exclusive
    creation of DIR/tst_run.lock.held naming the holder (host, pid, since when), removed on
    release, and one warning line says so (`say`). Nobody removes that file for a holder that
    dies without releasing: a rerun on the same host takes it over once its process is gone;
    a run on another host refuses, naming the file to remove if no run holds it."""

    def __init__(self, run_dir, say=None):
        self.root = Path(run_dir)
        self.path = self.root / LOCK
        self.file = self.root / LOCK_FILE
        self._fd = None
        self._own_file = None  # the content of LOCK_FILE while this object holds it
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
        """The lock without flock: create LOCK_FILE exclusively; take over one whose holder
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
            aside = self.file.with_name(f"{LOCK_FILE}.stale.{os.getpid()}")
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


# --------------------------------------------------------------------------------------------
# Damaged checkpoints
# --------------------------------------------------------------------------------------------


def checkpoint_problem(checkpoint_dir, iteration: int, *, release: bool = False) -> Optional[str]:
    """Why the checkpoint of `iteration` in a save directory (with `release`, Megatron's
    `release/` checkpoint, which its tracker names "release") cannot be loaded, or None.

    Reads only metadata: for torch_dist, that metadata.json and `.metadata` parse and that
    every storage file they name exists and is as long as the metadata says; for the legacy
    torch format, that each rank's file exists and is not empty."""
    it_dir = Path(checkpoint_dir) / ("release" if release else f"iter_{iteration:07d}")
    if not it_dir.is_dir():
        return f"{it_dir} is missing"
    meta = it_dir / "metadata.json"
    if meta.is_file():
        try:
            backend = json.loads(meta.read_text()).get("sharded_backend")
        except ValueError as err:
            return f"{meta} is not JSON ({err})"
        if backend != "torch_dist":
            return None  # another sharded backend: left to Megatron's loader
        if not (it_dir / ".metadata").is_file():
            return f"{it_dir / '.metadata'} is missing"
        try:
            from torch.distributed.checkpoint import FileSystemReader

            storage = FileSystemReader(str(it_dir)).read_metadata().storage_data
        except Exception as err:  # any unpickling failure means the file is damaged
            return f"{it_dir / '.metadata'} cannot be read ({type(err).__name__}: {err})"
        needed: dict[str, int] = {}
        for info in storage.values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
        for name, size in sorted(needed.items()):
            path = it_dir / name
            if not path.is_file():
                return f"{path} is missing"
            if path.stat().st_size < size:
                return f"{path} is truncated ({path.stat().st_size:,} of {size:,} bytes)"
        return None
    ranks = sorted(it_dir.glob("mp_rank_*/model_optim_rng.pt"))
    if not ranks:
        return f"{it_dir} holds neither a torch_dist checkpoint (metadata.json) nor mp_rank_*/model_optim_rng.pt"
    for path in ranks:
        if path.stat().st_size == 0:
            return f"{path} is empty"
    return None


def _tracked(checkpoint_dir: Path) -> tuple[Optional[int], Optional[str]]:
    """(the iteration the tracker names, None) or (None, why the tracker is unreadable)."""
    try:
        return latest_iteration(checkpoint_dir), None
    except Exception as err:  # garbage in the tracker file
        return None, f"its tracker cannot be read ({type(err).__name__}: {err})"


def _saved_iterations(checkpoint_dir: Path) -> list[int]:
    found = []
    for path in Path(checkpoint_dir).glob("iter_*"):
        if path.is_dir() and path.name[5:].isdigit():
            found.append(int(path.name[5:]))
    return sorted(found, reverse=True)


def usable_checkpoint(checkpoint_dir) -> tuple[Optional[int], list[str]]:
    """(the iteration a resume of this save directory can load, [what is damaged and why]).

    The tracked checkpoint when it is complete; else the newest complete one before it
    (None if there is none)."""
    directory = Path(checkpoint_dir)
    tracked, why = _tracked(directory)
    if tracked is None and why is None:
        return None, []
    problems = []
    if why is not None:
        problems.append(f"{directory}: {why}")
    else:
        release = (directory / MEGATRON_TRACKER).is_file() and \
            (directory / MEGATRON_TRACKER).read_text(errors="replace").strip() == "release"
        problem = checkpoint_problem(directory, tracked, release=release)
        if problem is None:
            return tracked, []
        problems.append(problem)
    for iteration in _saved_iterations(directory):
        if tracked is not None and iteration >= tracked:
            continue
        problem = checkpoint_problem(directory, iteration)
        if problem is None:
            return iteration, problems
        problems.append(problem)
    return None, problems


def fall_back(checkpoint_dir, iteration: Optional[int], say) -> None:
    """Make `iteration` the checkpoint a resume loads: every newer checkpoint (damaged) is
    renamed `iter_NNNNNNN.damaged` (nothing is deleted), and the tracker names `iteration`
    (its old text is kept as `<tracker>.damaged`); with None, the directory is left with no
    tracker, i.e. as a phase that has not saved. Each step is said through `say`."""
    import os

    directory = Path(checkpoint_dir)
    for saved in _saved_iterations(directory):
        if iteration is None or saved > iteration:
            src = directory / f"iter_{saved:07d}"
            dst = src.with_name(src.name + ".damaged")
            n = 1
            while dst.exists():
                dst, n = src.with_name(f"{src.name}.damaged{n}"), n + 1
            os.replace(src, dst)
            say(f"moved the damaged checkpoint {src} to {dst}")
    tracker = directory / MEGATRON_TRACKER
    if tracker.exists():
        os.replace(tracker, tracker.with_name(tracker.name + ".damaged"))
    if (directory / BRIDGE_TRACKER).exists():
        os.replace(directory / BRIDGE_TRACKER, directory / (BRIDGE_TRACKER + ".damaged"))
    if iteration is not None:
        tmp = tracker.with_name(tracker.name + ".tmp")
        tmp.write_text(str(iteration))
        os.replace(tmp, tracker)
        say(f"{directory} now resumes from its complete checkpoint of iteration {iteration}")
    else:
        say(f"{directory} holds no complete checkpoint: its phase starts again")


def damaged_checkpoint_fallbacks(run_dir, plan: TSTPlan, names: SettingNames) -> list[tuple[Path, Optional[int], list[str]]]:
    """Before a resume: for each phase directory whose latest checkpoint is damaged, the
    checkpoint to fall back to, as [(directory, iteration or None, [what is damaged])]; empty
    when nothing is damaged. Changes nothing (`fall_back` applies them). Raises ValueError,
    naming the path and the fix, when there is nothing complete to fall back to.

    The newest complete checkpoint of the same phase is taken. Phase 2 with none falls back
    to phase 1's handoff (phase 2 starts again from it); phase 1's directory is not touched
    once phase 2 has saved, so the handoff is never given up for a later phase-1 state.
    Nothing ever falls back to a start from scratch."""
    p1_dir, p2_dir = phase_dir(run_dir, 1), phase_dir(run_dir, 2)
    two_phases = 1 in run_phases(plan)
    fixes = []
    it2, problems2 = usable_checkpoint(p2_dir)
    if problems2:
        if it2 is None and not (two_phases and checkpoint_problem(p1_dir, plan.phase1_iters) is None
                                and _tracked(p1_dir) == (plan.phase1_iters, None)):
            raise ValueError(
                f"{p2_dir} holds no complete checkpoint ({'; '.join(problems2)}) and there is "
                f"no complete phase-1 handoff to restart phase 2 from; restore the damaged files, "
                f"or move {p2_dir} aside to train {'phase 2' if two_phases else 'the run'} again"
            )
        fixes.append((p2_dir, it2, problems2))
        return fixes  # phase 2 resumes (or restarts from the handoff): phase 1 is left as it is
    if it2 is not None or not two_phases:
        return fixes
    it1, problems1 = usable_checkpoint(p1_dir)
    if problems1:
        if it1 is None:
            raise ValueError(
                f"{p1_dir} holds no complete checkpoint ({'; '.join(problems1)}); restore the "
                f"damaged files, or move {p1_dir} aside to train phase 1 again from iteration 0"
            )
        fixes.append((p1_dir, it1, problems1))
    return fixes
