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
