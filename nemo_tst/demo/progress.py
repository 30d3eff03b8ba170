"""Live progress of runs trained side by side: one line per run, drawn in place on a terminal.

Each line shows the run's step (and phase, for a TST run), its latest training loss, its latest
held-out loss and an ETA from the step rate since its trainer started its loop.
"""

import shutil
import sys
import threading
import time
from typing import Optional

__all__ = ["Progress", "duration"]


def duration(seconds: float) -> str:
    """`42s`, or `3m07s` from a minute on."""
    seconds = max(int(round(seconds)), 0)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """One live line per run: step, latest training loss, latest held-out loss, ETA.

    On a terminal the lines are redrawn in place; otherwise (CI logs, a pipe) each run prints a
    plain line at most every `every` seconds and when it finishes, after `[tag]`. `feed` takes
    the trainer's output lines (from any thread), `note` prints one of the caller's own lines.
    `runs`: per run, `phase1_iters` (0 or absent: no phase shown)."""

    def __init__(self, runs: dict[str, dict], stream=None, *, tty: Optional[bool] = None, every: float = 30.0,
                 tag: str = "demo"):
        self.stream = stream or sys.stdout
        self.tag = tag
        self.tty = self.stream.isatty() if tty is None else tty
        self.every = every
        self.lock = threading.Lock()
        self.state = {name: dict(info, step=None, loss=None, held_out=None, rate_from=None,
                                 status="waiting", printed=0.0) for name, info in runs.items()}
        self.drawn = 0  # live lines currently on the terminal
        self.name_width = max(9, *(len(name) + 1 for name in runs))  # the lines' columns align

    # -- input ----------------------------------------------------------------------------------
    def feed(self, name: str, line: str) -> None:
        from nemo_tst.training.logs import is_training_start, iteration_line, training_loss, validation_line

        st = self.state[name]
        now = time.time()
        if is_training_start(line):  # a trainer process starts its loop: restart the rate
            st["rate_from"] = None
            return
        held_out = validation_line(line)
        if held_out is not None:
            st["held_out"] = held_out[1]
            return
        parsed = iteration_line(line)
        if parsed is None:
            return
        it, total, values = parsed
        if "tst loss" not in values and "lm loss" not in values:
            return
        st.update(step=it, total=total, status="training", loss=training_loss(values))
        if st["rate_from"] is None:
            st["rate_from"] = (it, now)
        self._update(name, now)

    def set_status(self, name: str, status: str) -> None:
        with self.lock:
            self.state[name]["status"] = status
            self._show(name, final=status not in ("waiting", "starting", "training"))

    def note(self, text: str) -> None:
        with self.lock:
            self._clear()
            self.stream.write(text + "\n")
            self._redraw()

    def close(self) -> None:
        with self.lock:
            self.drawn = 0
            self.stream.flush()

    # -- output ---------------------------------------------------------------------------------
    def line(self, name: str) -> str:
        st = self.state[name]
        head = f"{name:<{self.name_width}}"
        if st["step"] is None:
            return f"{head}{st['status']}"
        phase = ""
        if st.get("phase1_iters"):
            phase = f" phase {1 if st['step'] <= st['phase1_iters'] else 2}"
        text = f"{head}step {st['step']:>5}/{st['total']}{phase} | loss {st['loss']:.3f}"
        if st["held_out"] is not None:
            text += f" | held-out {st['held_out']:.3f}"
        if st["status"] == "training":
            text += f" | ETA {self._eta(st)}"
        else:
            text += f" | {st['status']}"
        return text

    def _eta(self, st) -> str:
        start = st["rate_from"]
        if start is None or st["step"] <= start[0]:
            return "..."
        rate = (st["step"] - start[0]) / max(time.time() - start[1], 1e-6)
        return duration((st["total"] - st["step"]) / rate)

    def _update(self, name: str, now: float) -> None:
        with self.lock:
            self._show(name, final=False)

    def _show(self, name: str, *, final: bool) -> None:
        if self.tty:
            self._clear()
            self._redraw()
            return
        st, now = self.state[name], time.time()
        if final or now - st["printed"] >= self.every:
            st["printed"] = now
            self.stream.write(f"[{self.tag}] {self.line(name)}\n")
            self.stream.flush()

    def _clear(self) -> None:
        if self.tty and self.drawn:
            self.stream.write(f"\x1b[{self.drawn}F")  # up to the first live line
            self.stream.write("\x1b[J")  # and clear from there down
        self.drawn = 0

    def _redraw(self) -> None:
        if not self.tty:
            self.stream.flush()
            return
        width = max(shutil.get_terminal_size((100, 24)).columns - 1, 20)  # a wrapped line would
        for name in self.state:  # take two rows and break the redraw
            self.stream.write(self.line(name)[:width] + "\n")
        self.drawn = len(self.state)
        self.stream.flush()
