"""Read the numbers back out of Megatron-LM's training log (what it prints on the last rank).

    " iteration        4/      10 | consumed samples: ... | lm loss: 6.138480E+00 | ..."
    " validation loss at iteration 10 | lm loss value: 5.613347E+00 | ..."
    "[tst] iteration 4 | phase 2 | s 1 | latent positions 32 | text tokens 1664"   (ours)

Megatron prints losses with seven significant digits; that is the precision of anything read
back here. Megatron 0.19 also does not reset its loss accumulator after the first iteration a
process logs, so the next line it prints averages that iteration in; the reader undoes this
(see `_unaverage`), which costs about one digit on that one line.
"""

import re
from dataclasses import dataclass, field

__all__ = ["TrainingLog", "parse_training_log"]

_FLOAT = r"([-+]?\d+\.\d+E[-+]\d+|nan|inf)"
_TRAIN = re.compile(r"\biteration\s+(\d+)/\s*(\d+) \|(.*)$")
_KEY_VALUE = re.compile(r"\s*([a-zA-Z][\w +\-]*?): " + _FLOAT + r" \|")
_VALID = re.compile(r"validation loss at iteration (\d+)( on \w+ set)? \| lm loss value: " + _FLOAT)
# Megatron's `print_rank_0("training ...")` as a process starts its loop. Searched, not
# matched: with several ranks writing to one pipe, another rank's output can share the line.
_PROCESS_START = re.compile(r"\btraining \.\.\.")
_TST = re.compile(r"^\[tst\] iteration (\d+) \| phase (\d) \| s (\d+) \| latent positions (\d+) \| text tokens (\d+)")


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
        row = self.train[iteration]
        return row["tst loss"] if "tst loss" in row else row["lm loss"]


def _unaverage(first_it: int, first: dict, it: int, reported: dict) -> dict:
    """The mean over iterations first_it+1 .. it from Megatron's mean over first_it .. it."""
    n = it - first_it + 1
    return {
        k: (v * n - first[k]) / (n - 1) if k in first and "loss" in k else v
        for k, v in reported.items()
    }


def parse_training_log(text: str) -> TrainingLog:
    log = TrainingLog()
    first = None  # (iteration, values) of the first line the current process printed
    for line in text.splitlines():
        if _PROCESS_START.search(line):
            first = "next"
        # Megatron prefixes a timestamp, and other ranks' output may precede it on the line.
        elif m := _TRAIN.search(line):
            it = int(m.group(1))
            values = {k.strip(): float(v) for k, v in _KEY_VALUE.findall(m.group(3))}
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
