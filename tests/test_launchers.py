"""Every launcher's Megatron arguments come from a recipe (`TSTRecipe.megatron_args()`), none is
written by hand: the one-node script, the slurm script, the demo, the quality benchmark and
the NeMo-Run stages. Each test compares a launcher's whole argv with the recipe's, so an
argument a launcher adds or changes on its own (a different --min-lr, a micro-batch) fails it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_tst import demo
from nemo_tst.recipes import load_recipe
from tests.benchmark_scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[1]

# A stand-in `nemo-tst` first on PATH: `plan` is the real CLI (this interpreter), every other
# command writes its arguments to $ARGV_FILE, one per line, instead of running.
SHIM = f"""#!/bin/sh
if [ "$1" = plan ]; then exec "{sys.executable}" -m nemo_tst.cli "$@"; fi
printf '%s\\n' "$@" > "$ARGV_FILE"
"""


def _shim_env(tmp_path: Path, **env) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "nemo-tst"
    shim.write_text(SHIM)
    shim.chmod(0o755)
    keep = {k: os.environ[k] for k in ("HOME", "TMPDIR", "PYTHONPATH") if k in os.environ}
    return {**keep, "PATH": f"{bin_dir}:/usr/bin:/bin", "ARGV_FILE": str(tmp_path / "argv"), **env}


def _launched(tmp_path: Path) -> list[str]:
    return (tmp_path / "argv").read_text().splitlines()


@pytest.mark.parametrize("env, args, recipe, gpus, overrides, extra", [
    # The defaults: the paper's 270M recipe on one node of 8 GPUs.
    ({}, [], "tst_llama3_270m", 8, [], []),
    # Every setting the script reads, recipe overrides and extra Megatron arguments.
    ({"RECIPE": "tst_tiny", "GPUS": "2", "TOKENIZER": "/data/tok.json", "ITERS": "40",
      "PRECISION": "fp8_current"},
     ["tst.bag_size=2", "training.lr=1e-3", "--eval-interval", "5"], "tst_tiny", 2,
     ["data.tokenizer=/data/tok.json", "training.train_iters=40", "tst.bag_size=2",
      "training.lr=1e-3", "precision=fp8_current"], ["--eval-interval", "5"]),
])
def test_pretrain_script_launches_the_recipe(tmp_path, env, args, recipe, gpus, overrides, extra):
    env = _shim_env(tmp_path, DATA="/data/corpus", SAVE="/ckpt/run1", **env)
    proc = subprocess.run(["bash", str(ROOT / "recipes" / "pretrain_gpt_tst.sh"), *args],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = load_recipe(recipe, gpus=gpus, overrides=[
        "data.prefix=/data/corpus", "run_dir=/ckpt/run1", *overrides]).megatron_args()
    assert _launched(tmp_path) == ["pretrain", "--nproc-per-node", str(gpus), *expected, *extra]


def test_pretrain_script_launches_nothing_when_plan_refuses(tmp_path):
    env = _shim_env(tmp_path, DATA="/data/corpus", SAVE="/ckpt/run1", GPUS="4")  # no 4-GPU preset
    proc = subprocess.run(["bash", str(ROOT / "recipes" / "pretrain_gpt_tst.sh")],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode != 0 and not (tmp_path / "argv").exists()
    assert "has parallel presets for" in proc.stderr and "nothing launched" in proc.stderr


def test_slurm_script_hands_the_recipe_to_nemo_run(tmp_path):
    """slurm_tst.sh names a recipe factory and sets recipe fields and the executor, no Megatron
    argument: the stages' arguments are the recipe's (test_nemo_run_stages_run_the_recipe)."""
    env = _shim_env(tmp_path, RECIPE="tst_llama3_270m", GPUS="64", ACCOUNT="acct", IMAGE="img",
                    DATA="/lustre/data", RUN_DIR="/lustre/ckpt")
    proc = subprocess.run(["bash", str(ROOT / "recipes" / "slurm_tst.sh"), "--dryrun"],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    argv = _launched(tmp_path)
    assert argv[:3] == ["run", "--factory", "tst_llama3_270m(gpus=64, precision=bf16)"]
    assert {"recipe.data.prefix=/lustre/data", "recipe.run_dir=/lustre/ckpt"} <= set(argv)
    assert argv[-1] == "--dryrun"
    assert all(a.startswith(("recipe.", "run.")) for a in argv[3:-1]), argv


DEMO_DATA = {"tokenizer": "/demo/data/tokenizer.json", "train_prefix": "/demo/data/stdlib_train",
             "valid_prefix": "/demo/data/stdlib_valid", "vocab_size": 1000}


@pytest.mark.parametrize("size", ["ci", "cpu", "gpu"])
@pytest.mark.parametrize("cpu", [True, False])
def test_demo_runs_are_the_size_recipe(size, cpu):
    """Each demo run: its size's recipe with the demo's data, the trained BPE's vocabulary, its
    own s (1 for the baseline), run directory and index cache, and the device."""
    recipe = demo.load_sizes()[size]["recipe"]
    tst = load_recipe(recipe).tst
    out = Path("/demo")
    argvs = demo.run_argvs(recipe, DEMO_DATA, out, bag_size=tst.bag_size,
                           phase1_fraction=tst.phase1_fraction, cpu=cpu)
    assert list(argvs) == ["baseline", "tst"]
    for name, s in {"baseline": 1, "tst": tst.bag_size}.items():
        expected = load_recipe(recipe, overrides=[
            "data.prefix=/demo/data/stdlib", "data.tokenizer=/demo/data/tokenizer.json",
            "model.vocab_size=1000", "data.num_workers=0", f"cpu={str(cpu).lower()}",
            "transformer_impl=local", f"tst.bag_size={s}", f"tst.phase1_fraction={tst.phase1_fraction}",
            f"run_dir=/demo/{name}", f"extra_args=--data-cache-path /demo/index_cache/{name}",
        ]).megatron_args()
        assert argvs[name] == expected, name


def test_quality_benchmark_runs_are_the_preset_recipe():
    quality = load_benchmark("quality")
    data = {"tokenizer": "/w/tokenizer.json", "train_prefix": "/w/code_train",
            "valid_prefix": "/w/code_valid", "vocab_size": 4000}
    for size, preset in quality.SIZES.items():
        recipe = quality.size_recipe(size, lr=2e-3)
        argv = quality.megatron_argv(recipe, data, steps=800, bag_size=4, r=0.3, warmup=40,
                                     eval_every=50, save_every=200, save=Path("/w/N800/tst/ckpt"),
                                     cpu=True, attention="sdpa", seed=1235, eval_iters=64)
        expected = load_recipe(preset["recipe"], overrides=[
            *preset["overrides"], "training.lr=2e-3", "training.min_lr=2e-4",
            "training.train_iters=800", "training.warmup_iters=40", "training.eval_interval=50",
            "training.save_interval=200", "training.log_interval=25", "tst.bag_size=4",
            "tst.phase1_fraction=0.3", "training.seed=1235", "training.eval_iters=64",
            "data.prefix=/w/code", "data.tokenizer=/w/tokenizer.json",
            "model.vocab_size=4000", "data.num_workers=0", "cpu=true", "transformer_impl=local",
            "run_dir=/w/N800/tst/ckpt",
            "extra_args=--data-cache-path /w/N800/tst/index_cache --tst-attention sdpa",
        ]).megatron_args()
        assert argv == expected, size


def test_nemo_run_stages_run_the_recipe():
    """Each NeMo-Run stage runs the recipe's arguments with only the phase's own added
    (`argv.phase_argv`: --tst-phase, --save/--load, --exit-interval, the handoff)."""
    pytest.importorskip("nemo_run", reason="NeMo-Run is the nemo extra: pip install nemo-tst[nemo]")
    from nemo_tst.recipes import check_recipe
    from nemo_tst.recipes.experiment import phase_tasks
    from nemo_tst.training.argv import phase_argv

    for overrides in (["tst.bag_size=4"], ["tst.bag_size=1"]):
        recipe = load_recipe("tst_llama3_270m", gpus=8, overrides=[
            "run_dir=/ckpt/a", "data.prefix=/data/d", *overrides])
        plan = check_recipe(recipe, local=False)[1]
        tasks = phase_tasks(recipe, plan)
        assert [phase for phase, _ in tasks] == ([1, 2] if recipe.tst.bag_size > 1 else [2])
        for phase, script in tasks:
            assert script.path == "nemo_tst.training.pretrain" and script.m
            assert script.args == phase_argv(recipe.megatron_args(), phase, Path("/ckpt/a"),
                                             plan.phase1_iters)
            # Beyond the phase's own arguments, exactly the recipe's.
            assert _without(script.args, PHASE_OWN) == _without(recipe.megatron_args(), PHASE_OWN)


PHASE_OWN = ("--tst-phase", "--save", "--load", "--exit-interval", "--tst-phase1-checkpoint")


def _without(argv: list[str], options) -> list[str]:
    """argv minus `options` and their values."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in options:
            skip = True
        else:
            out.append(a)
    return out
