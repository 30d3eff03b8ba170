"""The Megatron-Bridge adapter trained for real: Bridge's own `pretrain` on CPU (gloo).

Every run is `python -m nemo_tst.bridge.cli` under torchrun, through tests/bridge_cpu_launch.py
(which adds only the test-only Transformer Engine import stand-in), with the recipe of
tests/bridge_recipes.py: the model, data, schedule and seed of tests/test_training_e2e.py's
Megatron-LM runs. One uninterrupted Bridge run (two launches: phase 1, then phase 2) is the
reference; the Megatron-LM run of the same model must give the same loss at every step.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_tst.core.run_dir import latest_iteration, phase_dir
from nemo_tst.training.logs import iteration_line, training_loss
from tests.distributed import free_port
from tests.bridge_recipes import write_recipe_module
from tests.test_training_e2e import N, N1, wsd_learning_rate

ROOT = Path(__file__).resolve().parent.parent
TST = ["--tst-cpu", "--tst-bag-size", "4", "--tst-phase1-fraction", "0.3"]


def bridge_launch(tmp: Path, recipe: str, *args: str, kill_at: int = 0, check: bool = True):
    """One `python -m nemo_tst.bridge.cli` launch (torchrun, one CPU rank). Returns
    (returncode, output). `kill_at`: the rank SIGKILLs itself once that iteration's
    checkpoint is written (a crash: no clean-up runs)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp / "recipes"), str(ROOT)]),
               CUDA_VISIBLE_DEVICES="")
    if kill_at:
        env["NEMO_TST_TEST_KILL_AFTER_SAVE"] = str(kill_at)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
           "--master-port", str(free_port()), str(ROOT / "tests" / "bridge_cpu_launch.py"),
           "--recipe", recipe, *args]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    out = done.stdout + done.stderr
    if check:
        assert done.returncode == 0, out[-6000:]
    return done.returncode, out


def bridge_losses(text: str) -> dict[int, dict]:
    """iteration -> values of Bridge's per-iteration lines (Bridge resets its loss sums after
    every line it prints, so no line needs `parse_training_log`'s correction)."""
    out = {}
    for line in text.splitlines():
        if parsed := iteration_line(line):
            out[parsed[0]] = parsed[2]
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from nemo_tst.demo import prepare_stdlib_data

    return prepare_stdlib_data(tmp_path_factory.mktemp("data"), max_bytes=300_000, vocab_size=512)


def recipe_for(tmp: Path, data: dict, **kw) -> str:
    return write_recipe_module(tmp / "recipes", "tiny_recipe", data, tmp / "run", **kw)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted Bridge run: the same command twice (phase 1, then phase 2)."""
    tmp = tmp_path_factory.mktemp("bridge_ref")
    recipe = recipe_for(tmp, data)
    _, first = bridge_launch(tmp, recipe, *TST)
    _, second = bridge_launch(tmp, recipe, *TST)
    _, third = bridge_launch(tmp, recipe, *TST)  # all done: returns at once
    losses = bridge_losses(first)
    assert not set(losses) & set(bridge_losses(second))
    losses.update(bridge_losses(second))
    return {"tmp": tmp, "run": tmp / "run", "recipe": recipe, "losses": losses,
            "first": first, "second": second, "third": third}


def test_both_phases_train_through_bridge_pretrain_and_hand_off(reference):
    losses, run = reference["losses"], reference["run"]
    assert sorted(losses) == list(range(1, N + 1))
    for it, values in losses.items():
        assert ("tst loss" in values) == (it <= N1), it  # multi-hot loss in phase 1 only
        assert ("tst loss t+4" in values) == (it <= N1), it
        assert ("lm loss" in values) == (it > N1), it
    # Phase 1 ends in Bridge's exit at n1; phase 2 is a resume of its checkpoint (optimizer,
    # scheduler, iteration), not a fine-tune.
    assert f"[exiting program at iteration {N1}]" in reference["first"]
    assert f"phase1 [ t 0/1, p 0/1 ] at iteration {N1}" in reference["second"]
    assert "successfully loaded checkpoint" in reference["second"]
    assert "the run is complete" in reference["third"]
    assert latest_iteration(phase_dir(run, 1)) == N1  # the handoff checkpoint is kept
    assert latest_iteration(phase_dir(run, 2)) == N

    # One WSD schedule over both phases, as Megatron-LM's run has.
    assert [losses[it]["learning rate"] for it in range(1, N + 1)] == pytest.approx(
        [wsd_learning_rate(it) for it in range(1, N + 1)], rel=1e-6
    )
    # Training lowers the loss in each phase.
    assert losses[N1]["tst loss"] < losses[1]["tst loss"]
    assert losses[N]["lm loss"] < losses[N1 + 1]["lm loss"]


def megatron_lm_args(data: dict) -> list[str]:
    """tests/test_training_e2e.py's `nemo-tst pretrain` arguments, weights drawn as Bridge
    draws them: Bridge's `pretrain` builds the model with `use_cpu_initialization=False`
    whatever the container says (setup() never passes it to get_model), so both runs use the
    model-parallel RNG path."""
    from tests.test_training_e2e import tiny_args

    args = tiny_args(data)
    args.remove("--use-cpu-initialization")
    return args


def test_bridge_and_megatron_lm_train_the_same_model(reference, data, tmp_path):
    """The same tiny model, data and seed through `nemo-tst pretrain` (Megatron-LM's trainer)
    and through the Bridge adapter: the same loss at every one of the N steps, both phases.

    Tolerance: both front doors run the same arithmetic in fp32 (megatron-core's GPTModel,
    nemo_tst's phase-1 model and loss, the same data stream, Adam, clipping and WSD schedule),
    so the losses agree to every printed digit. Two things cost digits: both trainers print 7
    significant digits, and Megatron-LM's second line of each launch averages the first one in,
    which the log reader undoes (`parse_training_log`) from two printed values. Each is at
    most 5e-7 relative, so 1e-5 relative is a bound no genuine difference (a different sample,
    initial weight or LR changes the loss at the 1e-3 level here) can hide under."""
    from tests.test_training_e2e import run_pretrain

    log, _ = run_pretrain(tmp_path / "run", megatron_lm_args(data))
    mlm = {it: training_loss(values) for it, values in log.train.items()}
    bridge = {it: training_loss(values) for it, values in reference["losses"].items()}
    assert sorted(mlm) == sorted(bridge) == list(range(1, N + 1))
    for it in range(1, N + 1):
        assert mlm[it] == pytest.approx(bridge[it], rel=1e-5), it
        kind = "tst loss" if it <= N1 else "lm loss"
        assert kind in log.train[it] and kind in reference["losses"][it], it


def test_phase_2_resumes_after_a_kill_with_the_same_losses(reference, data, tmp_path):
    """Phase 2 killed (SIGKILL) right after its checkpoint at iteration 6; the same command
    resumes from it and ends with the uninterrupted run's losses."""
    recipe = recipe_for(tmp_path, data)
    bridge_launch(tmp_path, recipe, *TST)  # phase 1
    rc, killed = bridge_launch(tmp_path, recipe, *TST, kill_at=6, check=False)
    assert rc != 0 and latest_iteration(phase_dir(tmp_path / "run", 2)) == 6, killed[-3000:]
    _, resumed = bridge_launch(tmp_path, recipe, *TST)
    assert "phase2 [ t 0/1, p 0/1 ] at iteration 6" in resumed
    after = bridge_losses(resumed)
    assert sorted(after) == list(range(7, N + 1))
    for it in after:
        assert after[it]["lm loss"] == reference["losses"][it]["lm loss"], it


def test_s1_is_one_launch_of_ordinary_training(data, tmp_path):
    recipe = recipe_for(tmp_path, data)
    _, out = bridge_launch(tmp_path, recipe, "--tst-cpu", "--tst-bag-size", "1")
    losses = bridge_losses(out)
    assert sorted(losses) == list(range(1, N + 1))
    assert latest_iteration(phase_dir(tmp_path / "run", 2)) == N
    assert not phase_dir(tmp_path / "run", 1).exists()


@pytest.mark.parametrize(
    "override, match",
    [
        ("train.exit_interval=5", r"cfg\.train\.exit_interval"),
        ("dataset.dataloader_type=cyclic", r"cfg\.dataset\.dataloader_type"),
        ("checkpoint.finetune=true", r"cfg\.checkpoint\.finetune"),
        ("checkpoint.save_optim=false", r"save_optim=False"),
        ("model.context_parallel_size=3", r"context_parallel_size"),
    ],
)
def test_the_launcher_refuses_what_tst_cannot_honour(data, tmp_path, override, match):
    """Overrides are applied before the phase containers are derived, so the recipe checks
    see them (no training starts: the refusal comes first)."""
    from nemo_tst.bridge.cli import main

    recipe_for(tmp_path, data)
    sys.path.insert(0, str(tmp_path / "recipes"))
    try:
        sys.modules.pop("tiny_recipe", None)
        with pytest.raises(ValueError, match=match):
            main(["--recipe", "tiny_recipe:recipe", "--tst-bag-size", "4", override])
    finally:
        sys.path.remove(str(tmp_path / "recipes"))
        sys.modules.pop("tiny_recipe", None)


def test_the_launcher_names_a_missing_recipe():
    from nemo_tst.bridge.cli import load_recipe, main

    with pytest.raises(ValueError, match="no recipe function 'no_such_recipe'"):
        load_recipe("no_such_recipe")
    import megatron.bridge.recipes

    assert load_recipe("llama32_1b_pretrain_config") is megatron.bridge.recipes.llama32_1b_pretrain_config
    assert load_recipe("tests.bridge_recipes:tiny_mock_pretrain_config").__module__ == "tests.bridge_recipes"
    with pytest.raises(SystemExit):
        main(["--recipe", "x", "--tst-bag-size", "4", "--unknown-flag"])

