"""`nemo-tst pretrain --hybrid-layer-pattern`: a TSTHybridModel through Megatron-LM's trainer on
CPU (both phases, the tst_tiny recipe), and the hybrid settings refused before launch in one
line."""

import math

import pytest

from nemo_tst.cli import main

PATTERN = "*-*-"  # tst_tiny's two GPT layers as hybrid layers


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from nemo_tst.demo import prepare_stdlib_data

    return prepare_stdlib_data(tmp_path_factory.mktemp("data"), max_bytes=300_000, vocab_size=512)


def recipe_argv(data, run_dir, *overrides) -> list[str]:
    """tst_tiny on CPU, 10 iterations of 32 latent positions (phase 1 = 3 of them, s = 4)."""
    from pathlib import Path

    from nemo_tst.recipes import load_recipe

    prefix = Path(data["train_prefix"]).parent / "stdlib"
    recipe = load_recipe("tst_tiny", overrides=[
        "cpu=true", f"data.prefix={prefix}", f"data.tokenizer={data['tokenizer']}",
        f"model.vocab_size={data['vocab_size']}", "model.num_layers=4", "model.seq_length=32",
        "training.train_iters=10", "training.eval_interval=5", "training.save_interval=5",
        "training.log_interval=1", f"run_dir={run_dir}", *overrides,
    ])
    return recipe.megatron_args()


def pretrain(run_dir, argv, nproc=1):
    """`nemo-tst pretrain` (in this process; the trainer runs in launched ranks) -> its log."""
    from nemo_tst.training.logs import parse_training_log

    log_file = run_dir.parent / f"{run_dir.name}.log"
    rc = main(["pretrain", "--nproc-per-node", str(nproc), "--log-file", str(log_file), *argv])
    assert rc == 0, log_file.read_text()[-4000:]
    return parse_training_log(log_file.read_text())


def hybrid_argv(data, run_dir, *extra) -> list[str]:
    # One micro-batch size for every layout, so that only the parallelism differs.
    return recipe_argv(data, run_dir) + ["--hybrid-layer-pattern", PATTERN, "--micro-batch-size", "2", *extra]


@pytest.fixture(scope="module")
def seed_checkpoint(data, tmp_path_factory):
    """Initial weights every run loads (--pretrained-checkpoint), so that PP=2, whose stages
    Megatron seeds differently, starts from the model of world size 1: a one-iteration phase 1,
    whose update runs at the warm-up's LR of 0."""
    run = tmp_path_factory.mktemp("seed") / "run"
    pretrain(run, hybrid_argv(data, run, "--train-iters", "2", "--lr-warmup-iters", "1",
                              "--lr-wsd-decay-iters", "1", "--tst-phase", "1"))
    return run / "phase1"


@pytest.fixture(scope="module")
def reference(data, seed_checkpoint, tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "run"
    argv = hybrid_argv(data, run, "--pretrained-checkpoint", str(seed_checkpoint))
    return {"run": run, "argv": argv, "log": pretrain(run, argv)}


def test_pretrain_trains_a_hybrid_model_through_both_phases(reference):
    from megatron.core import dist_checkpointing

    from nemo_tst.training.driver import latest_iteration

    run, log = reference["run"], reference["log"]
    assert latest_iteration(run / "phase1") == 3 and latest_iteration(run / "phase2") == 10
    # The checkpoint is a HybridModel's: four layers, attention then MLP, and HybridStack's
    # final norm (a GPTModel's is decoder.final_layernorm).
    keys = set(dist_checkpointing.load_tensors_metadata(str(run / "phase2" / "iter_0000010")))
    assert {"decoder.final_norm.weight", "decoder.layers.2.self_attention.linear_qkv.weight",
            "decoder.layers.3.mlp.linear_fc2.weight"} <= keys
    assert not any(k.startswith(("decoder.layers.0.mlp", "decoder.layers.1.self_attention")) for k in keys)
    assert sorted(log.train) == list(range(1, 11))
    assert all(("tst loss" in log.train[it]) == (it <= 3) for it in range(1, 11))
    assert all(math.isfinite(log.loss(it)) for it in range(1, 11))
    assert log.loss(10) < log.loss(4)  # phase 2 learns


@pytest.mark.parametrize("parallel", [["--tensor-model-parallel-size", "2"],
                                      ["--pipeline-model-parallel-size", "2"]], ids=["tp2", "pp2"])
def test_model_parallel_runs_match_world_size_1(reference, parallel, tmp_path):
    run = tmp_path / "run"
    argv = [a if a != str(reference["run"]) else str(run) for a in reference["argv"]]
    log = pretrain(run, argv + parallel, nproc=2)
    losses = lambda log: [log.loss(it) for it in range(1, 11)]  # noqa: E731
    assert losses(log) == pytest.approx(losses(reference["log"]), rel=2e-5)


def test_layers_the_local_implementation_lacks_are_refused_in_one_line(data, tmp_path, capsys):
    run = tmp_path / "run"
    argv = recipe_argv(data, run) + ["--hybrid-layer-pattern", "M*-*-"]
    assert main(["pretrain", *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert ("--hybrid-layer-pattern 'M*-*-' has 'M' layers, but --transformer-impl local builds only "
            "attention ('*') and MLP ('-') layers") in err
    assert not run.exists()


def test_a_hybrid_model_without_transformer_engine_off_cpu_is_refused(data, tmp_path, monkeypatch):
    """On a GPU machine without TE, HybridStack's final norm (TE's TENorm) cannot be built:
    refused before launch, naming the flag, the reason and the ways out."""
    import importlib.util

    import torch

    from nemo_tst.training.arguments import check_runtime
    from nemo_tst.training.arguments import parse_megatron_args

    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("Transformer Engine is installed here")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu_argv = recipe_argv(data, tmp_path / "run", "cpu=false", "transformer_impl=local", "precision=bf16")
    check_runtime(parse_megatron_args(gpu_argv))  # a GPT model: fine
    with pytest.raises(ValueError, match=r"--hybrid-layer-pattern needs Transformer Engine.*final norm "
                                         r"with TE's TENorm.*'\*-' repeated N times is --num-layers N"):
        check_runtime(parse_megatron_args(gpu_argv + ["--hybrid-layer-pattern", PATTERN]))
    cpu_argv = recipe_argv(data, tmp_path / "run")
    check_runtime(parse_megatron_args(cpu_argv + ["--hybrid-layer-pattern", PATTERN]))  # the stand-in


def test_rope_scaling_which_hybrid_model_lacks_is_refused(data, tmp_path):
    from nemo_tst.training.arguments import check_runtime
    from nemo_tst.training.arguments import parse_megatron_args

    argv = recipe_argv(data, tmp_path / "run") + ["--hybrid-layer-pattern", PATTERN, "--use-rope-scaling"]
    with pytest.raises(ValueError, match="HybridModel has no RoPE scaling"):
        check_runtime(parse_megatron_args(argv))
