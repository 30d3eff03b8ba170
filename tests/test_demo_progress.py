"""`nemo_tst.demo.progress`: the live line per run, plain in a log and redrawn on a terminal."""

import io
import re

from nemo_tst.demo.progress import Progress, duration

LINE = (" [2026-12-01 10:00:00] iteration      {it:>3}/     100 | consumed samples: 16 | "
        "learning rate: 1.000000E-03 | {key}: {loss:.6E} | loss scale: 1.0 |\n")


def test_progress_lines_plain_and_in_place():
    plain = io.StringIO()
    progress = Progress({"baseline": {"phase1_iters": 0}, "tst": {"phase1_iters": 30}}, plain, tty=False, every=0)
    progress.feed("tst", "training ...\n")
    progress.feed("tst", LINE.format(it=10, key="tst loss", loss=7.25))
    progress.feed("tst", " validation loss at iteration 10 | lm loss value: 6.500000E+00 | lm loss PPL: 1.0 |\n")
    progress.feed("tst", LINE.format(it=40, key="lm loss", loss=5.5))
    progress.set_status("baseline", "complete (reused)")
    lines = plain.getvalue().splitlines()
    assert lines[0].startswith("[demo] tst") and "step    10/100 phase 1 | loss 7.250" in lines[0]
    assert "step    40/100 phase 2 | loss 5.500 | held-out 6.500 | ETA" in lines[1]
    assert lines[-1] == "[demo] baseline complete (reused)"

    term = io.StringIO()
    progress = Progress({"a": {}, "b": {}}, term, tty=True)
    progress.feed("a", LINE.format(it=1, key="lm loss", loss=8.0))
    progress.feed("b", LINE.format(it=2, key="lm loss", loss=7.0))
    progress.note("[demo] a note")
    text = term.getvalue()
    assert "\x1b[2F\x1b[J" in text  # the two live lines are redrawn in place, not appended
    screen = re.sub(r"\x1b\[\d*[A-Z]", "", text.split("\x1b[2F\x1b[J")[-1])  # the last redraw
    assert screen.splitlines() == ["[demo] a note", "a        step     1/100 | loss 8.000 | ETA ...",
                                   "b        step     2/100 | loss 7.000 | ETA ..."]


def test_duration():
    assert [duration(s) for s in (-3, 0, 59.4, 60, 125, 3600)] == ["0s", "0s", "59s", "1m00s", "2m05s", "60m00s"]


def test_plain_lines_carry_the_callers_tag():
    plain = io.StringIO()
    progress = Progress({"baseline_x1.25": {}, "tst_s4": {}}, plain, tty=False, every=0, tag="quality")
    progress.feed("baseline_x1.25", LINE.format(it=5, key="lm loss", loss=6.25))
    progress.set_status("baseline_x1.25", "done")
    progress.set_status("tst_s4", "complete (reused)")
    assert plain.getvalue().splitlines() == [  # the names padded to the longest: columns align
        "[quality] baseline_x1.25 step     5/100 | loss 6.250 | ETA ...",
        "[quality] baseline_x1.25 step     5/100 | loss 6.250 | done",
        "[quality] tst_s4         complete (reused)",
    ]
