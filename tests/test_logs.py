"""Reading Megatron's training log back (nemo_tst/training/logs.py)."""

from nemo_tst.training.logs import parse_training_log


def _line(it, loss, key="lm loss"):
    return (f" [2026-11-23 10:00:0{it}] iteration        {it}/      10 | consumed samples: {4 * it} | "
            f"learning rate: 1.000000E-03 | {key}: {loss:.6E} | loss scale: 1.0 |")


def test_the_second_line_after_a_start_is_unaveraged():
    """Megatron 0.19 prints iteration k+1 averaged with k, the first iteration a process logs."""
    first, second, third = 6.25, 6.0, 5.5
    text = "\n".join(["training ...", _line(1, first), _line(2, (first + second) / 2), _line(3, third)])
    log = parse_training_log(text)
    assert [log.loss(i) for i in (1, 2, 3)] == [first, second, third]


def test_process_start_shared_with_another_ranks_output():
    """With several ranks on one pipe the start marker can share its line with other output."""
    first, second = 6.25, 6.0
    for start in ("[rank1]: building model ...training ...", "training ...[default1]: done"):
        text = "\n".join([start, _line(4, first), _line(5, (first + second) / 2)])
        assert parse_training_log(text).loss(5) == second


def test_tst_loss_is_the_phase_1_loss():
    log = parse_training_log("\n".join(["training ...", _line(1, 7.0, key="tst loss")]))
    assert log.loss(1) == 7.0


def test_a_loss_key_no_longer_reported_is_not_read_as_zero():
    """One launch through both code paths (s = 1): after phase 1, Megatron keeps printing its
    "tst loss" key as 0; the loss of those iterations is the next-token one."""
    stale = _line(5, 6.0).replace("| loss scale", "| tst loss: 0.000000E+00 | loss scale")
    log = parse_training_log("\n".join(["training ...", _line(4, 7.0, key="tst loss"), _line(5, 6.0), stale]))
    assert log.loss(4) == 7.0 and log.loss(5) == 6.0
    assert "tst loss" not in log.train[5]


def test_an_interval_over_the_switch_in_one_process():
    """s = 1 in one launch: the line whose interval spans both code paths carries both keys,
    each a sum over the interval's iterations divided by all of them."""
    both = _line(10, 3.0).replace("| loss scale", "| tst loss: 3.100000E+00 | loss scale")
    log = parse_training_log("\n".join([both]))
    assert log.loss(10) == 6.1
