"""Several runs trained side by side, each through `nemo-tst pretrain`'s driver, with live progress.

Each run is the driver's `run` in a thread of this process: it plans, checks and launches the
run's phases as child processes, and resumes a run from its checkpoints. The trainer's whole
output goes to the run's log file, never to the terminal; the terminal shows `Progress` lines.
A run that fails does not stop the others: `side_by_side` reports the failures after all have
ended.

With a deadline (`train(..., deadline=)`), each phase is launched on its own with Megatron's
`--exit-duration-in-mins` set to the time left when it starts: Megatron then saves and exits
cleanly, and `train` again resumes the run.
"""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

from nemo_tst.demo.progress import Progress
from nemo_tst.errors import RunFailed, is_user_error

__all__ = ["OutOfTime", "finished", "side_by_side", "train"]


class OutOfTime(RunFailed):
    """A run's deadline came, or it was stopped, before its last phase could start."""


def finished(save: Path, iterations: int) -> bool:
    """True once the run in `save` holds its final checkpoint (phase 2's, iteration N)."""
    from nemo_tst.core.run_dir import RunDirectory

    return RunDirectory(save).latest(2) == iterations


def _launches(argv: list[str], deadline: Optional[float]) -> list[list[str]]:
    """The driver calls of one run: all at once, or with a deadline one per phase."""
    if deadline is None:
        return [argv]
    from nemo_tst.core.settings import setting_flag
    from nemo_tst.training.argv import last_value

    phases = ("2",) if last_value(argv, setting_flag("bag_size")) == "1" else ("1", "2")
    return [[*argv, "--tst-phase", phase] for phase in phases]


def train(name: str, argv: list[str], *, log_file: Path, progress: Progress, nproc: int = 1,
          env: Optional[dict] = None, say: Optional[Callable[[str], None]] = None,
          deadline: Optional[float] = None, stop: Optional[threading.Event] = None) -> float:
    """Train (or resume) one run; returns its wall-clock seconds.

    The trainer's output goes to `log_file`, each line also to `progress`; the driver's own
    lines go to `say` (default: `log_file` too). Raises the driver's error (status FAILED), or
    `OutOfTime` when `deadline` (a `time.time()`) leaves under a minute for a phase to start,
    or `stop` is set before one starts."""
    from nemo_tst.training.driver import run

    def into_log(text: str) -> None:
        with open(log_file, "a") as log:
            log.write(text + "\n")

    start = time.time()
    progress.set_status(name, "starting (imports, model, data)")
    try:
        for launch in _launches(argv, deadline):
            what = "its start" if deadline is None else f"phase {launch[-1]}"
            if stop is not None and stop.is_set():
                raise OutOfTime(f"stopped before {what}")
            if deadline is not None:
                minutes = int((deadline - time.time()) // 60)
                if minutes < 1:
                    raise OutOfTime(f"out of time before {what}")
                launch = [*launch, "--exit-duration-in-mins", str(minutes)]
            run(launch, nproc=nproc, log_file=log_file, on_line=lambda line: progress.feed(name, line),
                say=say or into_log, env=env)
    except BaseException:
        progress.set_status(name, "FAILED")
        raise
    progress.set_status(name, "done")
    return time.time() - start


def side_by_side(job: Callable[[str], object], names: list[str], *, workers: int) -> dict:
    """{name: job(name)} for each run, `workers` runs at a time. A failed run leaves the others
    running; once all have ended, the failures are raised together as one `RunFailed` (a bug
    among them is raised as it is, with its traceback).
    Interrupted (Ctrl-C, a signal's exception), runs not yet started are not started."""
    results, errors = {}, []
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = {name: pool.submit(job, name) for name in names}
        for name, future in futures.items():
            try:
                results[name] = future.result()
            except Exception as err:  # the other runs keep going; report after all
                errors.append(err)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    if errors:
        bugs = [err for err in errors if not is_user_error(err)]
        if bugs:
            raise bugs[0]
        raise RunFailed("; ".join(str(e) for e in errors))
    return results
