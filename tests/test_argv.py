"""nemo_tst.training.argv: what the driver removes from and sets in a run's arguments."""

from nemo_tst.training.arguments import parse_megatron_args
from nemo_tst.training.argv import (
    MANAGED_BY_PHASE,
    last_value,
    phase_argv,
    with_data_tokenizer,
    without_options,
)


def test_without_options_drops_both_spellings_and_their_values():
    argv = ["--save", "/a", "--lr", "1e-3", "--load=/b", "--tst-cpu", "--save", "/c", "--seed", "7"]
    assert without_options(argv, "--save", "--load") == ["--lr", "1e-3", "--tst-cpu", "--seed", "7"]
    assert without_options(argv, "--seed") == argv[:-2]
    # A name that only starts like an option is another option.
    assert without_options(["--save-interval", "5"], "--save") == ["--save-interval", "5"]


def test_last_value_follows_argparse():
    argv = ["--tst-bag-size", "2", "--lr", "1", "--tst-bag-size=4", "--tst-bag-size-x", "9"]
    assert last_value(argv, "--tst-bag-size") == "4"
    assert last_value(argv, "--lr") == "1"
    assert last_value(argv, "--seed") is None
    assert last_value(["--lr"], "--lr") is None  # no value follows


def test_each_phase_gets_its_directories_and_only_one_of_each_managed_option(tmp_path):
    run = ["--tst-bag-size", "4", "--save", "/old", "--load=/old", "--exit-interval", "9",
           "--tst-phase", "2", "--tst-phase1-checkpoint", "/x", "--lr", "1e-3"]
    one, two = phase_argv(run, 1, tmp_path, 3), phase_argv(run, 2, tmp_path, 3)
    for argv in (one, two):
        assert without_options(argv, *MANAGED_BY_PHASE) == ["--tst-bag-size", "4", "--lr", "1e-3"]
        assert all([a.split("=")[0] for a in argv].count(o) <= 1 for o in MANAGED_BY_PHASE)
    assert [last_value(one, o) for o in ("--tst-phase", "--save", "--load", "--exit-interval")] == \
        ["1", str(tmp_path / "phase1"), str(tmp_path / "phase1"), "3"]
    assert last_value(one, "--tst-phase1-checkpoint") is None
    assert [last_value(two, o) for o in ("--tst-phase", "--save", "--load", "--tst-phase1-checkpoint")] == \
        ["2", str(tmp_path / "phase2"), str(tmp_path / "phase2"), str(tmp_path / "phase1")]
    assert last_value(two, "--exit-interval") is None  # phase 2 runs to --train-iters


def test_the_data_tokenizer_sizes_the_vocabulary_unless_the_run_does():
    base = ["--tst-bag-size", "2"]
    args = parse_megatron_args(with_data_tokenizer(base, 300, has_vocab_size=False))
    assert (args.tokenizer_type, args.vocab_size) == ("NullTokenizer", 300)
    args = parse_megatron_args(with_data_tokenizer([*base, "--vocab-size", "512"], 300, has_vocab_size=True))
    assert (args.tokenizer_type, args.vocab_size) == ("NullTokenizer", 512)
