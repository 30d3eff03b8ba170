"""`nemo_tst.demo.results`: a run's curves and text tokens from a hand-written trainer log."""

from nemo_tst.demo.results import read_run, steps_to_reach
from nemo_tst.recipes import load_recipe


def _train(it: int, key: str, loss: float) -> str:
    return (f" [2026-12-01 10:00:00] iteration {it:>8}/      30 | consumed samples: {8 * it} | "
            f"learning rate: 1.000000E-03 | {key}: {loss:.6E} | loss scale: 1.0 |")


def _valid(it: int, loss: float, end: str = "") -> str:
    return f" validation loss at iteration {it}{end} | lm loss value: {loss:.6E} | lm loss PPL: 1.0 |"


# tst_tiny: 30 steps of a global batch of 8 sequences of 64 tokens (512 tokens a step); the TST
# run has s = 4 and r = 0.3, so phase 1 is iterations 1-9 and reads 4 x 512 text tokens a step.
TST_LOG = "\n".join([
    "[nemo-tst] phase 1 (iterations 1-9) on 1 process(es)",
    _train(2, "tst loss", 7.0), _train(8, "tst loss", 6.0),
    _train(10, "lm loss", 5.5), _valid(10, 6.8), _valid(20, 5.2), _train(30, "lm loss", 4.5),
    _valid(30, 4.9), _valid(30, 4.95, " on validation set"),  # the end-of-training line: not a point
])


def test_a_tst_run_read_from_its_log_and_arguments(tmp_path):
    log = tmp_path / "tst.log"
    log.write_text(TST_LOG)
    run = read_run(log, load_recipe("tst_tiny").megatron_args())
    assert run == {
        "bag_size": 4,
        "phase1_iters": 9,
        "valid": {10: 6.8, 20: 5.2, 30: 4.9},
        "train_loss": {"phase1": {2: 7.0, 8: 6.0}, "phase2": {10: 5.5, 30: 4.5}},
        "text_tokens": 9 * 4 * 512 + 21 * 512,
        "text_tokens_at": {10: 9 * 4 * 512 + 512, 20: 9 * 4 * 512 + 11 * 512, 30: 9 * 4 * 512 + 21 * 512},
    }


def test_a_baseline_has_no_phase_1_and_a_missing_log_no_points(tmp_path):
    argv = load_recipe("tst_tiny", overrides=["tst.bag_size=1"]).megatron_args()
    log = tmp_path / "baseline.log"
    log.write_text("\n".join([_train(2, "lm loss", 7.5), _valid(10, 6.0)]))
    run = read_run(log, argv)
    assert (run["bag_size"], run["phase1_iters"], run["text_tokens"]) == (1, 0, 30 * 512)
    assert run["train_loss"] == {"phase1": {}, "phase2": {2: 7.5}}
    assert run["text_tokens_at"] == {10: 10 * 512}

    missing = read_run(tmp_path / "never_started.log", argv)
    assert missing["valid"] == {} and missing["train_loss"] == {"phase1": {}, "phase2": {}}


def test_steps_to_reach_is_the_first_evaluation_at_or_below():
    valid = {30: 4.9, 10: 6.8, 20: 5.2}
    assert steps_to_reach(valid, 5.2) == 20
    assert steps_to_reach(valid, 6.0) == 20
    assert steps_to_reach(valid, 7.0) == 10
    assert steps_to_reach(valid, 4.0) is None
    assert steps_to_reach(valid, None) is None  # no baseline loss to reach
