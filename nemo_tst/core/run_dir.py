"""A TST run directory: its layout, what it holds, which of its checkpoints are complete.
Every reader of a run directory goes through `RunDirectory` (the driver, both adapters, the
export, the demo, the benchmarks); the lock a run holds on it is `nemo_tst.core.run_lock`.

    DIR/tst_run.json          what was trained here: the TST settings, the plan, the model shape
    DIR/tst_run.lock          the lock (`RunLock`); DIR/tst_run.lock.held where flock is missing
    DIR/train.log             the trainer's output, unless the launch names another log
    DIR/phase1/               phase 1 saves here; it ends with the checkpoint of iteration n1
    DIR/phase2/               phase 2 loads DIR/phase1 the first time, then itself; saves here
    DIR/phaseP/iter_NNNNNNN/  one checkpoint; the tracker names the latest complete one

Phase 2 never writes into phase 1's directory, so the handoff checkpoint is never overwritten
or deleted. Each phase directory is an ordinary Megatron checkpoint directory, whose tracker
the trainer writes only once a save is complete: an interrupted save is never the latest.
With s = 1 there is no phase 1 (`run_phases`): the whole run is phase 2, iterations 1..N,
saved in and resumed from DIR/phase2.

A checkpoint is complete when every file its metadata names is there at its full length
(`checkpoint_problem`). The checkpoint a phase resumes from, and the one an export reads, is
its newest complete checkpoint at or before the tracked one (`usable_checkpoint`,
`complete_iterations`); a damaged newer one is moved aside before a resume (`fall_back`).
"""

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

from nemo_tst.core.plan import TSTPlan, run_phases
from nemo_tst.core.settings import SettingNames, TSTSettings

__all__ = [
    "BRIDGE_TRACKER", "ITERATION_DIR", "LOCK", "LOCK_FILE", "LOG", "MANIFEST", "MEGATRON_TRACKER",
    "PHASE_DIRS", "RELEASE_DIR", "RunDirectory", "checkpoint_problem", "complete_iterations",
    "fall_back", "latest_iteration", "phase_start", "settings_identity", "usable_checkpoint",
]

MANIFEST = "tst_run.json"
LOCK = "tst_run.lock"
LOCK_FILE = "tst_run.lock.held"
LOG = "train.log"
PHASE_DIRS = {1: "phase1", 2: "phase2"}
MEGATRON_TRACKER = "latest_checkpointed_iteration.txt"
"""Megatron-LM's tracker ("release" or the iteration); Bridge writes it too."""
BRIDGE_TRACKER = "latest_train_state.pt"
"""Megatron-Bridge's tracker: its TrainState.state_dict(), {"step": tensor, ...}."""
ITERATION_DIR = "iter_{:07d}"
"""One checkpoint in a save directory: `ITERATION_DIR.format(iteration)`."""
RELEASE_DIR = "release"
"""Megatron's checkpoint of a converted model (iteration 0); its tracker then holds this name."""


@dataclass(frozen=True)
class RunDirectory:
    """The run directory DIR of one TST run (Megatron's `--save`, Bridge's `checkpoint.save`)."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def of_phase_dir(cls, path) -> Optional["RunDirectory"]:
        """The run directory whose phase directory `path` is (a rank's `--save`), or None."""
        path = Path(path)
        return cls(path.parent) if path.name in PHASE_DIRS.values() else None

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def lock(self) -> Path:
        return self.root / LOCK

    @property
    def lock_file(self) -> Path:
        """Where `flock` is unsupported: exists while a run holds the directory."""
        return self.root / LOCK_FILE

    @property
    def log(self) -> Path:
        """The trainer's output when the launch names no other log file."""
        return self.root / LOG

    def phase_dir(self, phase: int) -> Path:
        return self.root / PHASE_DIRS[phase]

    def iteration_dir(self, phase: int, iteration: int) -> Path:
        return self.phase_dir(phase) / ITERATION_DIR.format(iteration)

    def holds_checkpoints_at(self, path) -> bool:
        """Whether `path` is the run directory or lies inside one of its phase directories."""
        where, root = Path(path).resolve(), self.root.resolve()
        return where == root or any(where.is_relative_to(root / name) for name in PHASE_DIRS.values())

    def latest(self, phase: int) -> Optional[int]:
        """The iteration the phase's tracker names (`latest_iteration`), or None."""
        return latest_iteration(self.phase_dir(phase))

    def latest_complete(self, phase: int) -> Optional[int]:
        """The iteration a resume of the phase loads: its newest complete checkpoint at or
        before the tracked one (`usable_checkpoint`), or None."""
        return usable_checkpoint(self.phase_dir(phase))[0]

    def complete_iterations(self, phase: int) -> list[int]:
        """Every complete checkpoint of the phase at or before the tracked one, oldest first."""
        return complete_iterations(self.phase_dir(phase))

    def is_complete(self, phase: int, iteration: int) -> bool:
        """Whether `complete_iterations(phase)` holds `iteration` (reading only its metadata)."""
        directory = self.phase_dir(phase)
        return any(it == iteration and checkpoint_problem(directory, it, release=release) is None
                   for it, release in _candidates(directory)[0])

    def is_run(self) -> bool:
        """Whether the directory holds a manifest or a phase's tracker."""
        return self.manifest.is_file() or any(
            (self.phase_dir(phase) / MEGATRON_TRACKER).is_file() for phase in PHASE_DIRS)

    def recorded_plan(self) -> dict:
        """The plan the manifest records (`claim`), as JSON; {} without a manifest."""
        if not self.manifest.is_file():
            return {}
        return json.loads(self.manifest.read_text()).get("plan", {})

    def has_checkpoints(self) -> bool:
        """Whether any phase directory of the run holds a checkpoint (complete or not)."""
        for phase in PHASE_DIRS:
            directory = self.phase_dir(phase)
            if _saved_iterations(directory) or (directory / MEGATRON_TRACKER).exists() or (directory / BRIDGE_TRACKER).exists():
                return True
        return False

    def progress(self, plan: TSTPlan, names: SettingNames) -> tuple[Optional[int], Optional[int]]:
        """(phase 1's, phase 2's) tracked iteration, after checking they belong to `plan`."""
        N, n1 = plan.train_iters, plan.phase1_iters
        p1_dir, p2_dir = self.phase_dir(1), self.phase_dir(2)
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

    def phases_to_run(self, plan: TSTPlan, names: SettingNames, wanted=(1, 2)) -> list[int]:
        """The phases of `wanted` still to run, in order, judged from the checkpoints on disk.

        Phase 1 is done once phase 1 holds iteration n1 (or phase 2 has started); phase 2 once
        it holds N. Asked for phase 2 alone before phase 1's handoff exists, refuses."""
        N, n1 = plan.train_iters, plan.phase1_iters
        p1, p2 = self.progress(plan, names)
        wanted = [p for p in wanted if p in run_phases(plan)]
        todo = []
        if 1 in wanted and p2 is None and (p1 or 0) < n1:
            todo.append(1)
        if 2 in wanted and (p2 or 0) < N:
            if 1 not in wanted and 1 in run_phases(plan) and p2 is None and p1 != n1:
                raise ValueError(
                    f"phase 2 needs phase 1's checkpoint of iteration {n1} in {self.phase_dir(1)}, "
                    f"found {'none' if p1 is None else f'iteration {p1}'}; run phase 1 first"
                )
            todo.append(2)
        return todo

    def phase2_source(self, plan: TSTPlan) -> Path:
        """Where phase 2 loads from, judged from what is on disk now, without checks
        (`phase_start` checks): its own directory once it holds a checkpoint, and at s = 1;
        before that phase 1's handoff."""
        return _phase2_source(plan, self.phase_dir(2), self.phase_dir(1))

    def check(self, identity: dict, names: SettingNames) -> None:
        """Refuse a directory that holds another run, or files that are no TST run's. Read-only.

        `identity`: every setting that fixes what the directory holds (the adapter adds the
        model shape to `settings_identity`). A manifest left by a start that never saved a
        checkpoint (a failed first launch) does not pin its settings: the corrected command
        claims the directory anew."""
        root, manifest = self.root, self.manifest
        identity = _as_json(identity)
        if manifest.is_file():
            try:
                previous = json.loads(manifest.read_text())["identity"]
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(
                    f"{manifest} cannot be read ({type(err).__name__}: {err}); restore it, or choose "
                    f"a new {names.run_dir} directory"
                ) from None
            diff = {k: (previous.get(k), v) for k, v in identity.items() if previous.get(k) != v}
            if diff and self.has_checkpoints():
                details = ", ".join(f"{k}: {a!r} there vs {b!r} now" for k, (a, b) in diff.items())
                raise ValueError(
                    f"{names.run_dir} {root} holds a different TST run ({details}); choose a new "
                    f"{names.run_dir} directory, or rerun with the original settings to resume it"
                )
            return
        ours = {self.lock.name, self.lock_file.name, self.log.name}
        if root.exists() and not root.is_dir():
            raise ValueError(f"{names.run_dir} {root} is a file, not a directory; choose a directory")
        if root.exists() and any(p.name not in ours for p in root.iterdir()):
            raise ValueError(
                f"{names.run_dir} {root} is not empty and holds no {MANIFEST}: it is not a TST run "
                f"directory; choose a new or empty {names.run_dir} directory"
            )

    def claim(self, identity: dict, plan: TSTPlan, names: SettingNames) -> None:
        """Record the run in the manifest (after `check`, which it repeats): written to a
        temporary file and renamed, so the manifest is never half written. Call it holding
        the `RunLock`, once every check has passed: it is the run's first write."""
        self.check(identity, names)
        self.root.mkdir(parents=True, exist_ok=True)
        record = {"identity": _as_json(identity),
                  "plan": asdict(plan) | {"superposition": asdict(plan.superposition)}}
        tmp = self.manifest.with_name(MANIFEST + ".tmp")
        tmp.write_text(json.dumps(record, indent=2, default=str))
        os.replace(tmp, self.manifest)

    def damaged_fallbacks(self, plan: TSTPlan, names: SettingNames) -> list[tuple[Path, Optional[int], list[str]]]:
        """Before a resume: for each phase directory whose latest checkpoint is damaged, the
        checkpoint to fall back to, as [(directory, iteration or None, [what is damaged])];
        empty when nothing is damaged. Changes nothing (`fall_back` applies them). Raises
        ValueError, naming the path and the fix, when there is nothing complete to fall back to.

        The newest complete checkpoint of the same phase is taken. Phase 2 with none falls
        back to phase 1's handoff (phase 2 starts again from it); phase 1's directory is not
        touched once phase 2 has saved, so the handoff is never given up for a later phase-1
        state. Nothing ever falls back to a start from scratch."""
        p1_dir, p2_dir = self.phase_dir(1), self.phase_dir(2)
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


# --------------------------------------------------------------------------------------------
# One phase's save directory: where a launch starts, which checkpoints are complete
# --------------------------------------------------------------------------------------------


def latest_iteration(checkpoint_dir) -> Optional[int]:
    """The iteration the tracker of a Megatron or Bridge save directory names, or None.
    Bridge's tracker first, else Megatron-LM's ("release" counts as 0)."""
    path = Path(checkpoint_dir)
    if (path / BRIDGE_TRACKER).is_file():
        import torch

        return int(torch.load(path / BRIDGE_TRACKER, map_location="cpu", weights_only=True)["step"])
    tracker = path / MEGATRON_TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text(errors="replace").strip()
    if text == RELEASE_DIR:
        return 0
    if not text.isdigit():
        raise ValueError(f"{tracker} holds {text[:40]!r}, not an iteration")
    return int(text)


def _phase2_source(plan: TSTPlan, own: Path, handoff: Path) -> Path:
    if 1 not in run_phases(plan) or latest_iteration(own) is not None:
        return own
    return handoff


def phase_start(plan: TSTPlan, phase: int, own: Path, handoff: Optional[Path]) -> tuple[Optional[Path], Optional[str]]:
    """Where a phase's launch loads from: (directory, None), or (None, why there is nothing to
    do). `own` is the phase's save directory, `handoff` phase 1's (for phase 2).

    Phase 1 and a started phase 2 resume from their own directory. Phase 2's first start
    loads phase 1's checkpoint of iteration n1, and refuses without it; at s = 1 it starts
    from iteration 0, in its own, empty directory."""
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
    if handoff is None or single:
        return own, None  # the caller chose what phase 2 loads, or there is no handoff
    got = latest_iteration(handoff)
    if got != n1:
        raise ValueError(
            f"phase 2 starts from phase 1's checkpoint of iteration {n1} in {handoff}, found "
            f"{'none' if got is None else f'iteration {got}'}: run phase 1 to its end first"
        )
    return handoff, None


def checkpoint_problem(checkpoint_dir, iteration: int, *, release: bool = False) -> Optional[str]:
    """Why the checkpoint of `iteration` in a save directory (with `release`, Megatron's
    `release/` checkpoint, which its tracker names "release") cannot be loaded, or None.

    Reads only metadata: for torch_dist, that metadata.json and `.metadata` parse and that
    every storage file they name exists and is as long as the metadata says; for the legacy
    torch format, that each rank's file exists and is not empty."""
    it_dir = Path(checkpoint_dir) / (RELEASE_DIR if release else ITERATION_DIR.format(iteration))
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
    """The iterations of the ITERATION_DIR directories in a save directory, newest first."""
    prefix = ITERATION_DIR.split("{", 1)[0]
    found = []
    for path in Path(checkpoint_dir).glob(prefix + "*"):
        suffix = path.name[len(prefix):]
        if path.is_dir() and suffix.isdigit():
            found.append(int(suffix))
    return sorted(found, reverse=True)


def _candidates(directory: Path) -> tuple[list[tuple[int, bool]], list[str]]:
    """([(iteration, is Megatron's release checkpoint)] a resume may load, newest first: the
    tracked one, then every saved one before it; [why the tracker cannot be read]). With an
    unreadable tracker every saved checkpoint is a candidate; with none, nothing is."""
    tracked, why = _tracked(directory)
    if why is not None:
        return [(it, False) for it in _saved_iterations(directory)], [f"{directory}: {why}"]
    if tracked is None:
        return [], []
    tracker = directory / MEGATRON_TRACKER
    release = tracker.is_file() and tracker.read_text(errors="replace").strip() == RELEASE_DIR
    older = [(it, False) for it in _saved_iterations(directory) if it < tracked]
    return [(tracked, release), *older], []


def usable_checkpoint(checkpoint_dir) -> tuple[Optional[int], list[str]]:
    """(the iteration a resume of this save directory can load, [what is damaged and why]).

    The tracked checkpoint when it is complete; else the newest complete one before it
    (None if there is none)."""
    directory = Path(checkpoint_dir)
    candidates, problems = _candidates(directory)
    for iteration, release in candidates:
        problem = checkpoint_problem(directory, iteration, release=release)
        if problem is None:
            return iteration, problems
        problems.append(problem)
    return None, problems


def complete_iterations(checkpoint_dir) -> list[int]:
    """Every checkpoint of a save directory a resume could fall back to (`usable_checkpoint`'s
    candidates that are complete), oldest first."""
    directory = Path(checkpoint_dir)
    return sorted(it for it, release in _candidates(directory)[0]
                  if checkpoint_problem(directory, it, release=release) is None)


def fall_back(checkpoint_dir, iteration: Optional[int], say) -> None:
    """Make `iteration` the checkpoint a resume loads: every newer checkpoint (damaged) is
    renamed `iter_NNNNNNN.damaged` (nothing is deleted), and the tracker names `iteration`
    (its old text is kept as `<tracker>.damaged`); with None, the directory is left with no
    tracker, i.e. as a phase that has not saved. Each step is said through `say`."""
    directory = Path(checkpoint_dir)
    for saved in _saved_iterations(directory):
        if iteration is None or saved > iteration:
            src = directory / ITERATION_DIR.format(saved)
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
