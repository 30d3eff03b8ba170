"""The `nemo-tst` command: help, preprocess, and bad input refused before any work, with
nothing on disk changed."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from nemo_tst.cli import main
from nemo_tst.recipes.catalog import load_recipe


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
    """`nemo-tst pretrain` with the `tst_tiny` recipe on CPU, sized for this data: 10 iterations
    at s = 4 (phase 1: 3), the WSD annealing over the last 2, a checkpoint every 5."""
    recipe = load_recipe("tst_tiny", gpus=1, overrides=[
        "cpu=true", f"data.prefix={data['prefix']}", "model.vocab_size=300", "model.seq_length=32",
        "parallel.micro_batch_size=2", "training.global_batch_size=4", "training.train_iters=10",
        "training.lr=1e-3", "training.min_lr=0", "training.warmup_iters=1", "training.decay_fraction=0.2",
        "training.save_interval=5", "tst.bag_size=4", f"run_dir={save}",
    ])
    assert recipe.data.tokenizer_path == str(data["tokenizer"])
    return ["pretrain", *recipe.megatron_args(), *extra]


def tree(path: Path) -> dict:
    return {str(p): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()} if path.exists() else {}


# (extra arguments, or a callable preparing the save directory and returning them; the words
# the message must contain). Each is refused before torchrun starts.
BAD_INPUTS = {
    "s below 1": (["--tst-bag-size", "0"], "--tst-bag-size (s) must be >= 1"),
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
    # Numbers that used to reach Python or Megatron as tracebacks inside the ranks.
    "zero micro-batch": (["--micro-batch-size", "0"], "--micro-batch-size=0 must be at least 1"),
    "zero sequence length": (["--seq-length", "0"], "--seq-length=0 must be at least 1"),
    "negative LR": (["--lr", "-1"], "--lr=-1.0 must be a finite number > 0"),
    "NaN LR": (["--lr", "nan"], "--lr=nan must be a finite number > 0"),
    "min LR above LR": (["--min-lr", "1"], "--min-lr=1.0 is above --lr=0.001"),
    # Megatron-LM's own validation, run before launch.
    "zero save interval (Megatron's rule)": (["--save-interval", "0"],
                                             "Megatron-LM refuses these arguments: --save-interval > 0"),
    "save interval missing (Megatron's rule)": (["--save-interval", None], "--save-interval is not None"),
    # Two options for one thing.
    "phase-1 length given twice": (["--tst-phase1-iters", "3", "--tst-phase1-fraction", "0.3"],
                                   "--tst-phase1-iters=3 and --tst-phase1-fraction=0.3 both set"),
    "unknown option": (["--tst-bag-sise", "4"], "unrecognized arguments: --tst-bag-sise"),
    # Settings the trainer cannot honour.
    "cyclic data loader": (["--dataloader-type", "cyclic"], "--dataloader-type cyclic: a sample's phase"),
    "external data loader": (["--dataloader-type", "external"], "use --dataloader-type single"),
    "full-iteration CUDA graphs": (["--cuda-graph-impl", "full_iteration"],
                                   "full-iteration CUDA graphs (--cuda-graph-impl full_iteration)"),
    "MLA, which the model builder does not build": (["--multi-latent-attention"],
                                                    "--multi-latent-attention: the TST model builder"),
    "QK L2 norm, likewise": (["--qk-l2-norm"], "does not build QK L2 normalisation"),
    "heterogeneous layers, likewise": (["--heterogeneous-layers-config-path", "/x.json"],
                                       "remove --heterogeneous-layers-config-path"),
    "document-reset positions": (["--reset-position-ids"], "--reset-position-ids is not supported"),
    "MoE communication overlap": (["--overlap-moe-expert-parallel-comm"], "remove it"),
    "fine-tuning instead of resuming": (["--finetune"], "--finetune loads weights only"),
    "phase 2 without the optimizer": (["--no-load-optim"], "--no-load-optim skips the optimizer"),
    "a pinned checkpoint step": (["--ckpt-step", "3"], "remove --ckpt-step"),
    # Fusions Megatron's defaults turn on, whose TE / Apex kernels this machine lacks.
    "gradient-accumulation fusion without Apex": (["--no-gradient-accumulation-fusion", None],
                                                  "add --no-gradient-accumulation-fusion"),
    "persistent layer norm without Apex": (["--no-persist-layer-norm", None], "add --no-persist-layer-norm"),
}
if not torch.cuda.is_available():
    BAD_INPUTS["no GPU and no --tst-cpu"] = (["--tst-cpu", None], "add --tst-cpu")
if importlib.util.find_spec("transformer_engine") is None:
    BAD_INPUTS |= {
        "FP8 without Transformer Engine": (["--fp8-format", "hybrid"],
                                           "--fp8-format hybrid needs Transformer Engine"),
        "TE layers without Transformer Engine": (["--transformer-impl", "transformer_engine"],
                                                 "--transformer-impl transformer_engine needs "
                                                 "Transformer Engine"),
        "fused RoPE without Transformer Engine": (["--no-rope-fusion", None], "add --no-rope-fusion"),
    }

# Whole commands other than `pretrain` (recipes: `nemo-tst plan` and `nemo-tst run`). "{tmp}"
# is the test's directory (whose contents must not change).
OTHER_COMMANDS = {
    "plan with an MFU of 0": (["plan", "tst_tiny", "--mfu", "0"], "argument --mfu: 0 is not in (0, 1]"),
    "plan with an MFU above 1": (["plan", "tst_tiny", "--mfu", "2"], "argument --mfu: 2 is not in (0, 1]"),
    "plan with negative corpus tokens": (["plan", "tst_tiny", "--corpus-tokens", "-1"],
                                         "--corpus-tokens: -1 is not a whole number of tokens"),
    "plan with zero layers": (["plan", "tst_tiny", "model.num_layers=0"], "model.num_layers=0 must be at least 1"),
    "plan with a negative LR": (["plan", "tst_tiny", "training.lr=-1"], "training.lr=-1.0 must be > 0"),
    "plan with phase 1 given twice": (["plan", "tst_tiny", "tst.phase1_iters=5", "tst.phase1_fraction=0.2"],
                                      "both set phase 1's length"),
    "preprocess with 0 workers": (["preprocess", "--input", "{tmp}", "--output-prefix", "{tmp}/run/c",
                                   "--train-tokenizer", "--vocab-size", "300", "--workers", "0"],
                                  "argument --workers: 0 is not a whole number >= 1"),
    "preprocess with a held-out fraction of 1.5": (
        ["preprocess", "--input", "{tmp}", "--output-prefix", "{tmp}/run/c", "--train-tokenizer",
         "--vocab-size", "300", "--held-out-fraction", "1.5"], "argument --held-out-fraction: 1.5 is not in [0, 1)"),
    "preprocess into existing outputs": (["preprocess", "--input", "{tmp}", "--output-prefix", "{data}",
                                          "--train-tokenizer", "--vocab-size", "300"],
                                         "exists; pass --overwrite"),
    "preprocess from a missing input": (["preprocess", "--input", "{tmp}/nothing", "--output-prefix",
                                         "{tmp}/run/c", "--train-tokenizer", "--vocab-size", "300"],
                                        "--input {tmp}/nothing does not exist"),
    "demo with s = 0": (["demo", "--bag-size", "0", "--out", "{tmp}/run"], "--bag-size (s) must be >= 1"),
    "demo with r = 1.5": (["demo", "--phase1-fraction", "1.5", "--out", "{tmp}/run"],
                          "--phase1-fraction=1.5 must lie strictly between 0 and 1"),
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
    """A run of another model that has trained (a start that never saved does not pin its
    settings: see test_a_failed_first_start_does_not_block_the_corrected_command)."""
    (save / "phase1").mkdir(parents=True)
    (save / "tst_run.json").write_text(json.dumps({"identity": {"hidden_size": 128}}))
    (save / "phase1" / "latest_checkpointed_iteration.txt").write_text("2")
    return []


def foreign_directory(save: Path, argv):
    save.mkdir(parents=True)
    (save / "notes.txt").write_text("someone else's files")
    return []


def phase2_without_phase1(save: Path, argv):
    return ["--tst-phase", "2"]


def checkpoint_past_the_end(save: Path, argv: list[str], iteration=50):
    """A genuine run directory of this plan whose phase 2 holds iteration 50 of 10."""
    from nemo_tst.training.arguments import parse_megatron_args, plan_from_args
    from nemo_tst.training.driver import claim_run_directory

    args = parse_megatron_args(argv[1:])
    claim_run_directory(save, args, plan_from_args(args))
    if iteration is not None:
        (save / "phase2").mkdir(parents=True)
        (save / "phase2" / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return []


def save_is_a_file(save: Path, argv):
    save.parent.mkdir(parents=True, exist_ok=True)
    save.write_text("not a directory")
    return []


def unreadable_tokenizer(save: Path, argv):
    bad = save.parent / "tokenizer.json"
    bad.write_text("{ this is not a tokenizer")
    return ["--tst-tokenizer", str(bad)]


def copy_of_data(save: Path, data_prefix: str) -> str:
    copy = save.parent / "data" / "corpus_train"
    copy.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".bin", ".idx", ".tst.json"):
        shutil.copy(data_prefix + suffix, str(copy) + suffix)
    return str(copy)


def truncated_index(save: Path, argv):
    prefix = copy_of_data(save, argv[argv.index("--train-data-path") + 1])
    with open(prefix + ".idx", "r+b") as f:
        f.truncate(40)
    return ["--train-data-path", prefix]


def tokenizer_of_other_data(save: Path, argv):
    from nemo_tst.data import train_bpe

    other = save.parent / "other_tokenizer.json"
    train_bpe([" ".join(f"v{i} x{i * 3}" for i in range(300))], vocab_size=300, save_path=other)
    return ["--tst-tokenizer", str(other)]


def data_ids_beyond_the_vocabulary(save: Path, argv):
    prefix = copy_of_data(save, argv[argv.index("--train-data-path") + 1])
    record = json.loads(Path(prefix + ".tst.json").read_text())
    record["max_token_id"] = 310  # as data made with a larger tokenizer would hold
    Path(prefix + ".tst.json").write_text(json.dumps(record))
    return ["--train-data-path", prefix]


def no_complete_checkpoint(save: Path, argv):
    """A run whose only phase-1 checkpoint lost its data file: nothing to fall back to."""
    checkpoint_past_the_end(save, argv, iteration=None)
    (save / "phase1" / "iter_0000002").mkdir(parents=True)
    (save / "phase1" / "iter_0000002" / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    (save / "phase1" / "latest_checkpointed_iteration.txt").write_text("2")
    return []


def garbage_tracker(save: Path, argv):
    checkpoint_past_the_end(save, argv, iteration=None)
    (save / "phase1").mkdir(parents=True)
    (save / "phase1" / "latest_checkpointed_iteration.txt").write_text("garbage\x00")
    return []


def other_target_weights(save: Path, argv):
    """The same run but trained with other --tst-target-weights: a different run."""
    checkpoint_past_the_end(save, [*argv, "--tst-target-weights", "4", "3", "2", "1"], iteration=None)
    (save / "phase1").mkdir(parents=True)
    (save / "phase1" / "latest_checkpointed_iteration.txt").write_text("2")
    return []


PREPARED = {
    "--save naming a regular file": (save_is_a_file, "is a file, not a directory"),
    "unreadable tokenizer.json": (unreadable_tokenizer, "is not a tokenizer.json the tokenizers library can read"),
    "truncated .idx": (truncated_index, "corpus_train.idx is"),
    "tokenizer of other data": (tokenizer_of_other_data, "was preprocessed with another tokenizer"),
    "--vocab-size below the data's largest id": (data_ids_beyond_the_vocabulary,
                                                 "--vocab-size 300 is below the largest token id"),
    "latest checkpoint damaged, none to fall back to": (no_complete_checkpoint, "holds no complete checkpoint"),
    "tracker holding garbage, nothing to fall back to": (garbage_tracker, "its tracker cannot be read"),
    "resume with other target weights": (other_target_weights, "tst_target_weights: [4.0, 3.0, 2.0, 1.0] there vs None now"),
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


def _without_option(argv: list[str], option: str) -> list[str]:
    at = argv.index(option)
    return argv[:at] + argv[at + 2:] if at + 1 < len(argv) and not argv[at + 1].startswith("--") else argv[:at] + argv[at + 1:]


USAGE_ERRORS = {"s not an integer", "unknown option", "plan with an MFU of 0", "plan with an MFU above 1",
                "plan with negative corpus tokens", "preprocess with 0 workers",
                "preprocess with a held-out fraction of 1.5"}
"""Cases whose command line does not parse: exit status 2 (every other refusal: 1)."""


@pytest.mark.parametrize("case", list(BAD_INPUTS) + list(PREPARED) + list(OTHER_COMMANDS))
def test_bad_input_is_refused_before_any_work(small_data, tmp_path, capsys, case, monkeypatch):
    """One line naming the setting, the exit status of its kind, no traceback, nothing
    launched or trained, nothing on disk changed."""
    monkeypatch.setenv("NEMORUN_HOME", str(tmp_path / "nemo_run"))
    monkeypatch.delenv("NEMO_TST_DEBUG", raising=False)
    save = tmp_path / "run"
    if case in BAD_INPUTS:
        extra, words = BAD_INPUTS[case]
        argv = pretrain_args(small_data, save)
        if None in extra:  # (option, None): the option left out
            argv = _without_option(argv, extra[0])
        else:
            if "--tst-phase1-iters" in extra:  # phase 1's length in iterations, not the recipe's r
                argv = _without_option(argv, "--tst-phase1-fraction")
            argv = argv + list(extra)
    elif case in PREPARED:
        prepare, words = PREPARED[case]
        argv = pretrain_args(small_data, save, *prepare(save, pretrain_args(small_data, save)))
    else:
        argv, words = OTHER_COMMANDS[case]
        fill = {"{tmp}": str(tmp_path), "{data}": str(small_data["prefix"])}
        for key, value in fill.items():
            argv = [a.replace(key, value) for a in argv]
            words = words.replace(key, value)
    before = tree(tmp_path)
    rc = main(argv)
    captured = capsys.readouterr()
    err = captured.err
    assert rc == (2 if case in USAGE_ERRORS else 1), err
    assert words in err, err
    assert len(err.strip().splitlines()) == 1, err  # one line
    assert "Traceback" not in err and "NEMO_TST_DEBUG" in err or case in USAGE_ERRORS, err
    assert "[nemo-tst] phase" not in captured.out + err  # nothing was launched
    assert "trained tokenizer" not in err  # no tokenizer trained
    assert tree(tmp_path) == before  # nothing on disk changed


def test_debug_switch_shows_the_traceback(small_data, tmp_path, monkeypatch):
    monkeypatch.setenv("NEMO_TST_DEBUG", "1")
    with pytest.raises(ValueError, match="--micro-batch-size=0 must be at least 1"):
        main(pretrain_args(small_data, tmp_path / "run", "--micro-batch-size", "0"))


def test_pretrain_help_lists_every_tst_option(capsys):
    from nemo_tst.training.arguments import add_tst_arguments

    import argparse

    assert main(["pretrain", "--help"]) == 0
    out = capsys.readouterr().out
    options = [a.option_strings[0] for a in add_tst_arguments(argparse.ArgumentParser())._actions
               if a.option_strings and a.option_strings[0].startswith("--tst-")]
    assert len(options) >= 13
    for option in options:
        assert option in out, option
    assert "(default: 0.3)" in out or "default 0.3" in out
    assert "--megatron-help" in out
    assert main(["pretrain", "--megatron-help"]) == 0
    assert "--num-layers" in capsys.readouterr().out  # Megatron's own, despite its '%' help string


def test_a_failed_first_start_does_not_block_the_corrected_command(small_data, tmp_path):
    """A manifest from a start that never saved a checkpoint does not pin its settings."""
    from nemo_tst.training.arguments import parse_megatron_args, plan_from_args
    from nemo_tst.training.driver import check_before_launch, claim_run_directory

    save = tmp_path / "run"
    first = pretrain_args(small_data, save, "--tst-bag-size", "2")[1:]
    args = parse_megatron_args(first)
    claim_run_directory(save, args, plan_from_args(args))  # the failed start's claim
    corrected = pretrain_args(small_data, save, "--tst-bag-size", "3")[1:]
    args = parse_megatron_args(corrected)
    check_before_launch(corrected, args, plan_from_args(args), 1)  # accepted
    claim_run_directory(save, args, plan_from_args(args))
    assert json.loads((save / "tst_run.json").read_text())["identity"]["tst_bag_size"] == 3
    # Once it has a checkpoint, the directory is that run's.
    (save / "phase1").mkdir()
    (save / "phase1" / "latest_checkpointed_iteration.txt").write_text("2")
    with pytest.raises(ValueError, match="holds a different TST run"):
        args = parse_megatron_args(first)
        check_before_launch(first, args, plan_from_args(args), 1)


def test_a_bug_deep_in_a_command_keeps_its_traceback(monkeypatch):
    """Only nemo-tst's own refusals are one line: a RuntimeError, or a ValueError raised inside
    a library and not wrapped, reaches the top with its traceback."""
    import json as json_module

    import nemo_tst.recipes

    monkeypatch.delenv("NEMO_TST_DEBUG", raising=False)

    def crash(*args, **kwargs):
        raise RuntimeError("an internal invariant broke")

    monkeypatch.setattr(nemo_tst.recipes, "plan_report", crash)
    with pytest.raises(RuntimeError, match="an internal invariant broke"):
        main(["plan", "tst_tiny"])
    monkeypatch.setattr(nemo_tst.recipes, "plan_report", lambda *a, **k: json_module.loads("{"))
    with pytest.raises(json_module.JSONDecodeError):
        main(["plan", "tst_tiny"])


def _below_a_file(tmp_path: Path) -> str:
    (tmp_path / "a_file").write_text("not a directory")
    return str(tmp_path / "a_file" / "sub")


# command -> (its arguments with {path}: a path whose parent is a regular file; the flag that gave it)
PATHS_BELOW_A_FILE = {
    "pretrain --save": (lambda data, path: pretrain_args(data, path), "--save"),
    "pretrain --log-file": (lambda data, path: pretrain_args(data, Path(path).parent.parent / "run",
                                                             "--log-file", path), "--log-file"),
    "preprocess --output-prefix": (lambda data, path: [
        "preprocess", "--input", str(data["root"] / "docs"), "--output-prefix", path,
        "--tokenizer", str(data["tokenizer"])], "--output-prefix"),
    "preprocess --output-prefix, training a tokenizer": (lambda data, path: [
        "preprocess", "--input", str(data["root"] / "docs"), "--output-prefix", path,
        "--train-tokenizer", "--vocab-size", "300"], "--output-prefix"),
    "demo --out": (lambda data, path: ["demo", "--size", "ci", "--out", path], "--out"),
    "plan --recipe-dir": (lambda data, path: ["plan", "tst_tiny", "--recipe-dir", path], "--recipe-dir"),
    "recipes --recipe-dir": (lambda data, path: ["recipes", "--recipe-dir", path], "--recipe-dir"),
}
"""`nemo-tst export-hf OUT` is in tests/test_export_hf.py, next to the run it exports."""


@pytest.mark.parametrize("case", list(PATHS_BELOW_A_FILE))
def test_a_path_below_a_regular_file_names_its_flag(small_data, tmp_path, capsys, monkeypatch, case):
    """An operating-system error on a path the user gave is one line naming the flag that gave
    it, not a bare "[Errno 17] File exists"."""
    monkeypatch.delenv("NEMO_TST_DEBUG", raising=False)
    argv, flag = PATHS_BELOW_A_FILE[case]
    path = _below_a_file(tmp_path)
    assert main(argv(small_data, path)) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert flag in err and path in err and "Errno" not in err and "Traceback" not in err, err
