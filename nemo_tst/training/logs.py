"""Read the numbers back out of Megatron-LM's training log (what it prints on the last rank).

    " iteration        4/      10 | consumed samples: ... | lm loss: 6.138480E+00 | ..."
    " validation loss at iteration 10 | lm loss value: 5.613347E+00 | ..."
    "[tst] iteration 4 | phase 2 | s 1 | latent positions 32 | text tokens 1664"   (ours)

Megatron prints losses with seven significant digits; that is the precision of anything read
back here. Megatron 0.19 also does not reset its loss accumulator after the first iteration a
process logs, so the next line it prints averages that iteration in; the reader undoes this
(see `_unaverage`), which costs about one digit on that one line. And a loss key a process
stops reporting (phase 1's "tst loss" in an s = 1 run, one launch through both code paths) is
printed as 0 from then on; the reader drops it (`_live`).
"""

import logging
import re
from dataclasses import dataclass, field

__all__ = [
    "TrainingLog", "is_progress_line", "is_training_start", "iteration_line", "parse_training_log",
    "progress_text",
    "quiet_cuda_runtime_notice", "training_loss", "validation_line",
]

_FLOAT = r"([-+]?\d+\.\d+E[-+]\d+|nan|inf)"
_TRAIN = re.compile(r"\biteration\s+(\d+)/\s*(\d+) \|(.*)$")
_KEY_VALUE = re.compile(r"\s*([a-zA-Z][\w +\-]*?): " + _FLOAT + r" \|")
_VALID = re.compile(r"validation loss at iteration (\d+)( on \w+ set)? \| lm loss value: " + _FLOAT)
# Megatron's `print_rank_0("training ...")` as a process starts its loop. Searched, not
# matched: with several ranks writing to one pipe, another rank's output can share the line.
_PROCESS_START = re.compile(r"\btraining \.\.\.")
_TST = re.compile(r"^\[tst\] iteration (\d+) \| phase (\d) \| s (\d+) \| latent positions (\d+) \| text tokens (\d+)")
# What a terminal shows of a run (`nemo-tst pretrain`): Megatron's per-interval lines,
# evaluations, checkpoints and early exit, nemo-tst's own lines ("[nemo-tst] ...", and each
# interval's "[tst] ..." phase and text-token count) and errors; not the argument dump, the
# start-up reports, warnings or notices.
_PROGRESS = re.compile(
    r"(?P<megatron>\biteration\s+\d+/\s*\d+ \||validation loss at iteration|"
    r"successfully (saved|loaded) checkpoint|\[?exiting program at iteration)|"
    r"^\[nemo-tst\]|^\[tst\] |^ERROR:|Error: |^Traceback"
)


# Megatron's timestamp before a per-interval or checkpoint line, as the text before a match ends.
_TIMESTAMP_BEFORE = re.compile(r" *\[\d{4}-\d\d-\d\d [\d:.]+\] *$")


def is_progress_line(line: str) -> bool:
    """Whether a trainer output line belongs on the terminal (see `_PROGRESS`)."""
    return bool(_PROGRESS.search(line)) and "warn" not in line.lower()


def progress_text(line: str):
    """The part of a trainer output line that belongs on the terminal, else None.

    With several ranks writing to one pipe, another rank's unfinished line can precede a progress
    line ("Number of parameters in transformer block in billions:  0.00 [2026-...] iteration
    1/ 6 | ..."): that prefix is cut, Megatron's timestamp kept. Other lines, errors included,
    come back whole."""
    if not is_progress_line(line):
        return None
    match = _PROGRESS.search(line)
    if match.group("megatron") is None:
        return line
    start = match.start()
    timestamp = _TIMESTAMP_BEFORE.search(line[:start])
    if timestamp is not None:
        start = timestamp.start()
    elif not line[:start].strip():
        start = 0  # only Megatron's indentation before it
    return line[start:]


CUDA_RUNTIME_NOTICE = "No CUDA runtime is found"
"""The start of what torch.utils.cpp_extension logs at import when a CUDA toolkit is installed
(CUDA_HOME, CUDA_PATH or nvcc on PATH) but torch sees no GPU; megatron.core imports that module
(tensor_parallel.random imports its `load_inline`), so every process that imports megatron.core
on such a CPU machine prints it once."""


class _DropCudaRuntimeNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(CUDA_RUNTIME_NOTICE)


def quiet_cuda_runtime_notice() -> None:
    """Keep torch's "No CUDA runtime is found, using CUDA_HOME=..." off this process's output.

    Call it before anything imports megatron.core. On a CPU machine the missing CUDA runtime is
    the point, not news. Only that one message is dropped: the module's other warnings (a
    compiler mismatch when building an extension, say) still show, and on a GPU machine, where
    torch never logs the notice, nothing changes. Calling it again does nothing."""
    cpp_extension_log = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _DropCudaRuntimeNotice) for f in cpp_extension_log.filters):
        cpp_extension_log.addFilter(_DropCudaRuntimeNotice())


def iteration_line(line: str):
    """(iteration, total, {"lm loss" | "tst loss" | "learning rate" ...: value}) of one of
    Megatron's per-interval lines, else None. Values as printed (see the averaging note above),
    without the stale keys (`_live`)."""
    m = _TRAIN.search(line)
    if m is None:
        return None
    values = {k.strip(): float(v) for k, v in _KEY_VALUE.findall(m.group(3))}
    return int(m.group(1)), int(m.group(2)), _live(values)


def _live(values: dict) -> dict:
    """The values without losses of exactly 0: once a loss key has been reported, Megatron
    prints it in every later line of the process, as 0, when nothing reports it any more (an
    s = 1 run takes phase 1's code path, "tst loss", then phase 2's, "lm loss", in one launch).
    A cross-entropy is never exactly 0."""
    live = {k: v for k, v in values.items() if not ("loss" in k and v == 0.0)}
    return live if any("loss" in k for k in live) else values


def validation_line(line: str):
    """(iteration, held-out loss) of a periodic validation line, else None (also for the
    end-of-training "on validation/test set" lines)."""
    m = _VALID.search(line)
    if m is None or m.group(2) is not None:
        return None
    return int(m.group(1)), float(m.group(3))


@dataclass
class TrainingLog:
    train: dict[int, dict[str, float]] = field(default_factory=dict)
    """iteration -> {"lm loss": ..., "tst loss": ..., "learning rate": ...}"""
    valid: dict[int, float] = field(default_factory=dict)
    """iteration -> held-out next-token loss (the periodic validation, not the final sets)"""
    text_tokens: dict[int, int] = field(default_factory=dict)
    """iteration -> text tokens trained on after it"""
    phase: dict[int, int] = field(default_factory=dict)

    def loss(self, iteration: int) -> float:
        """The training loss of an iteration: multi-hot in phase 1, next-token in phase 2."""
        return training_loss(self.train[iteration])


def training_loss(values: dict) -> float:
    """The training loss of one per-interval line's values (`iteration_line`).

    "tst loss" (phase 1, multi-hot) or "lm loss" (phase 2, next-token). A line with both comes
    from an interval over the switch in one process, i.e. an s = 1 run (phase 1's code path at
    s = 1 is next-token training): Megatron divides each key's sum by all the interval's
    iterations, so the interval's mean loss is their sum."""
    if "tst loss" in values and "lm loss" in values:
        return values["tst loss"] + values["lm loss"]
    return values["tst loss"] if "tst loss" in values else values["lm loss"]


def _unaverage(first_it: int, first: dict, it: int, reported: dict) -> dict:
    """The mean over iterations first_it+1 .. it from Megatron's mean over first_it .. it."""
    n = it - first_it + 1
    return {
        k: (v * n - first[k]) / (n - 1) if k in first and "loss" in k else v
        for k, v in reported.items()
    }


def is_training_start(line: str) -> bool:
    """Whether a trainer output line is Megatron's "training ..." as a process starts its
    training loop (after arguments, model, data and checkpoint load)."""
    return bool(_PROCESS_START.search(line))


def parse_training_log(text: str) -> TrainingLog:
    log = TrainingLog()
    first = None  # (iteration, values) of the first line the current process printed
    for line in text.splitlines():
        if is_training_start(line):
            first = "next"
        # Megatron prefixes a timestamp, and other ranks' output may precede it on the line.
        elif parsed := iteration_line(line):
            it, _, values = parsed
            if first == "next":
                first = (it, values)
            elif first is not None:
                values = _unaverage(first[0], first[1], it, values)
                first = None
            log.train[it] = values
        elif m := _VALID.search(line):
            if m.group(2) is None:  # skip the end-of-training "on validation/test set" lines
                log.valid[int(m.group(1))] = float(m.group(3))
        elif m := _TST.match(line):
            it = int(m.group(1))
            log.phase[it] = int(m.group(2))
            log.text_tokens[it] = int(m.group(5))
    return log
