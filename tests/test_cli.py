"""The `nemo-tst` command: help, preprocess, and bad input refused before any work, with
nothing on disk changed."""

import importlib.util
import json
from pathlib import Path

import pytest

from nemo_tst.cli import main


def test_help_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    assert "nemo-tst pretrain" in capsys.readouterr().out
    assert main(["train"]) == 2
    assert "unknown command 'train'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    docs = root / "docs"
    docs.mkdir()
    for i in range(6):
        words = " ".join(f"w{(j * 7 + i) % 101}" for j in range(400 + 10 * i))
        (docs / f"doc{i}.txt").write_text(f"document {i}: {words}")
    prefix = root / "out" / "corpus"
    assert main(["preprocess", "--input", str(docs), "--output-prefix", str(prefix),
                 "--train-tokenizer", "--vocab-size", "300", "--held-out-fraction", "0.2"]) == 0
    return {"prefix": prefix, "tokenizer": Path(f"{prefix}_tokenizer.json"), "root": root}


def test_preprocess_writes_indexed_datasets_and_refuses_to_overwrite(small_data, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from nemo_tst.data import HFTokenizer

    prefix = small_data["prefix"]
    train = IndexedDataset(f"{prefix}_train")
    valid = IndexedDataset(f"{prefix}_valid")
    assert len(train) == 5 and len(valid) == 1
    tok = HFTokenizer.from_file(small_data["tokenizer"])
    texts = sorted(tok.detokenize(train[i][:-1].tolist()) for i in range(len(train)))
    assert all(t.startswith("document ") for t in texts)
    before = Path(f"{prefix}_train.bin").read_bytes()
    assert main(["preprocess", "--input", str(small_data["root"] / "docs"), "--output-prefix",
                 str(prefix), "--tokenizer", str(small_data["tokenizer"])]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert Path(f"{prefix}_train.bin").read_bytes() == before


def pretrain_args(data, save, *extra):
    return [
        "pretrain", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--train-iters", "10", "--lr", "1e-3",
        "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "2", "--lr-warmup-iters", "1",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "300",
        "--train-data-path", f"{data['prefix']}_train", "--valid-data-path", f"{data['prefix']}_valid",
        "--tst-tokenizer", str(data["tokenizer"]), "--tst-bag-size", "4", "--save", str(save),
        "--transformer-impl", "local", *extra,
    ]


def tree(path: Path) -> dict:
    return {str(p): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()} if path.exists() else {}


# (extra arguments, or a callable preparing the save directory and returning them; the words
# the message must contain). Each is refused before torchrun starts.
BAD_INPUTS = {
    "s below 1": (["--tst-bag-size", "0"], "--tst-bag-size / --tst-target-weights: bag_size (s) must be >= 1"),
    "s not an integer": (["--tst-bag-size", "2.5"], "invalid int value"),
    "r of 0": (["--tst-phase1-fraction", "0"], "--tst-phase1-fraction=0.0 must lie strictly between 0 and 1"),
    "r above 1": (["--tst-phase1-fraction", "1.5"], "strictly between 0 and 1"),
    "phase 1 of all steps": (["--tst-phase1-iters", "10"], "--tst-phase1-iters=10 must be between 1"),
    "phase 1 rounding to 0 steps": (["--tst-phase1-fraction", "0.01"], "gives 0 phase-1 iterations"),
    "L vs tp under SP": (["--tensor-model-parallel-size", "3", "--sequence-parallel",
                          "--seq-length", "32"], "divisible by --tensor-model-parallel-size=3"),
    "L vs 2cp": (["--context-parallel-size", "3"], "divisible by 2 x --context-parallel-size = 6"),
    "warm-up past the schedule": (["--lr-warmup-iters", "10"], "--lr-warmup-iters=10 must be smaller"),
    "decay inside phase 1": (["--lr-wsd-decay-iters", "9"],
                             "starts the WSD annealing at iteration 1 of a 10-iteration decay, inside phase 1"),
    "short decay anneals in phase 1": (["--lr-decay-iters", "4"],
                                       "starts the WSD annealing at iteration 2 of a 4-iteration decay"),
    "tokenizer larger than model vocab": (["--vocab-size", "100"], "set --vocab-size"),
    "data path missing": (["--train-data-path", "/nonexistent/corpus"], "does not exist"),
    "tokenizer missing": (["--tst-tokenizer", "/nonexistent/tokenizer.json"], "does not exist"),
    "explicit --load": (["--load", "/elsewhere"], "--load is managed by nemo-tst"),
    "exit interval": (["--exit-interval", "5"], "--exit-interval is set by nemo-tst"),
    "MTP in phase 1": (["--mtp-num-layers", "1"], "multi-token prediction"),
    "FP8 token count": (["--fp8-format", "hybrid", "--micro-batch-size", "1", "--seq-length", "40",
                         "--max-position-embeddings", "40"], "to be a multiple of 16"),
    "experts not divisible by EP": (["--num-experts", "3", "--expert-model-parallel-size", "2",
                                     "--nproc-per-node", "2"], "divisible by --expert-model-parallel-size 2"),
    "EP larger than the ranks": (["--num-experts", "4", "--expert-model-parallel-size", "4",
                                  "--nproc-per-node", "2"], "must divide the 2 ranks"),
    "EP without experts": (["--expert-model-parallel-size", "2", "--nproc-per-node", "2"],
                           "needs an MoE model"),
    "ranks vs tp x pp": (["--tensor-model-parallel-size", "2", "--nproc-per-node", "3"],
                         "not a multiple of tp x pp x cp"),
    "global batch vs micro batch x dp": (["--global-batch-size", "3"], "must be a multiple of --micro-batch-size"),
    "data smaller than one global batch": (["--global-batch-size", "512"], "fewer than one global batch"),
    "corpus smaller than the plan, strict": (["--train-iters", "2000", "--tst-strict-data"],
                                             "tokens will repeat"),
    "MXFP8 on a GPU older than Blackwell": (["--fp8-format", "e4m3", "--fp8-recipe", "mxfp8"],
                                            "--fp8-recipe mxfp8 needs a Blackwell GPU"),
}
if importlib.util.find_spec("transformer_engine") is None:
    BAD_INPUTS |= {
        "FP8 without Transformer Engine": (["--fp8-format", "hybrid"],
                                           "--fp8-format hybrid needs Transformer Engine"),
        "TE layers without Transformer Engine": (["--transformer-impl", "transformer_engine"],
                                                 "--transformer-impl transformer_engine needs "
                                                 "Transformer Engine"),
    }

# Whole commands other than `pretrain` (recipes: `nemo-tst plan` and `nemo-tst run`).
OTHER_COMMANDS = {
    "unknown recipe name (plan)": (["plan", "tst_llama4"], "unknown recipe 'tst_llama4'"),
    "unknown recipe name (run)": (["run", "--factory", "tst_llama4", "--dryrun"],
                                  "unknown recipe 'tst_llama4' for --factory"),
    "unknown override key (plan)": (["plan", "tst_tiny", "model.num_layerz=3"],
                                    "unknown override key 'model.num_layerz'; model has:"),
    "unknown override key (run)": (["run", "--factory", "tst_tiny", "recipe.tst.bag_sise=4", "--dryrun"],
                                   "unknown override key 'tst.bag_sise'; tst has:"),
    "recipe preset that does not fit (MoE on 1 GPU)": (["plan", "tst_qwen3_10b_a1b", "--gpus", "1"],
                                                       "One GPU cannot hold 10B parameters"),
    "recipe precision that does not exist": (["plan", "tst_tiny", "--precision", "fp4"],
                                             "unknown precision 'fp4'"),
}


def different_run(save: Path, argv):
    (save).mkdir(parents=True)
    (save / "tst_run.json").write_text(json.dumps({"identity": {"hidden_size": 128}}))
    return []


def foreign_directory(save: Path, argv):
    save.mkdir(parents=True)
    (save / "notes.txt").write_text("someone else's files")
    return []


def phase2_without_phase1(save: Path, argv):
    return ["--tst-phase", "2"]


def checkpoint_past_the_end(save: Path, argv: list[str]):
    """A genuine run directory of this plan whose phase 2 holds iteration 50 of 10."""
    from nemo_tst.training.arguments import plan_from_args
    from nemo_tst.training.driver import claim_run_directory, parse_megatron_args

    args = parse_megatron_args(argv[1:])
    claim_run_directory(save, args, plan_from_args(args))
    (save / "phase2").mkdir(parents=True)
    (save / "phase2" / "latest_checkpointed_iteration.txt").write_text("50")
    return []


PREPARED = {
    "output directory holding a different run": (different_run, "holds a different TST run"),
    "output directory that is not a TST run": (foreign_directory, "is not a TST run directory"),
    "phase 2 with no phase-1 checkpoint": (phase2_without_phase1, "phase 2 needs phase 1's checkpoint"),
    "checkpoint past the plan's end": (checkpoint_past_the_end, "past the plan's end"),
}


def test_wsd_without_its_annealing_length_is_refused_before_any_work(small_data, tmp_path, capsys):
    # Megatron's scheduler asserts on it only once the model is built.
    argv = pretrain_args(small_data, tmp_path / "run")
    at = argv.index("--lr-wsd-decay-iters")
    del argv[at:at + 2]
    assert main(argv) not in (0, None)
    err = capsys.readouterr().err
    assert "--lr-decay-style WSD needs --lr-wsd-decay-iters" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", list(BAD_INPUTS) + list(PREPARED) + list(OTHER_COMMANDS))
def test_bad_input_is_refused_before_any_work(small_data, tmp_path, capsys, case, monkeypatch):
    monkeypatch.setenv("NEMORUN_HOME", str(tmp_path / "nemo_run"))
    save = tmp_path / "run"
    if case in BAD_INPUTS:
        extra, words = BAD_INPUTS[case]
        argv = pretrain_args(small_data, save, *extra)
    elif case in PREPARED:
        prepare, words = PREPARED[case]
        argv = pretrain_args(small_data, save, *prepare(save, pretrain_args(small_data, save)))
    else:
        argv, words = OTHER_COMMANDS[case]
    before = tree(save)
    try:
        rc = main(argv)
    except SystemExit as exit:  # argparse's own type errors
        rc = exit.code
    err = capsys.readouterr().err
    assert rc not in (0, None), err
    assert words in err, err
    assert "[nemo-tst] phase" not in err  # nothing was launched
    assert tree(save) == before  # nothing on disk changed
