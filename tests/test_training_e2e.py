"""Two-phase TST through Megatron-LM's real trainer on CPU: handoff, TP=2, PP=2, kill/resume,
and the vanilla-GPT reload of the final checkpoint.

Every run here is `nemo-tst pretrain` in a subprocess (torchrun, gloo), exactly as a user runs
it. One reference run (world size 1) is shared; the others are compared against its log.
"""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_tst.training.logs import parse_training_log

N, N1, SAVE_INTERVAL = 10, 3, 2  # --train-iters, phase-1 iterations (r = 0.3), checkpoints
LR, MIN_LR, WARMUP, DECAY = 3e-3, 3e-4, 2, 2


def wsd_learning_rate(it: int) -> float:
    """The LR of iteration `it` (from 1) in one WSD schedule over both phases of these runs:
    linear warm-up over WARMUP, flat through the handoff, linear decay over the last DECAY."""
    if it <= WARMUP:
        return LR * it / WARMUP
    if it <= N - DECAY:
        return LR
    return MIN_LR + (LR - MIN_LR) * (1 - (it - (N - DECAY)) / DECAY)


def tiny_args(data: dict) -> list[str]:
    """The `tst_tiny` recipe on CPU for this data: N iterations at s = 4, phase 1 the first N1,
    one WSD schedule (warm-up WARMUP, annealing over the last DECAY), a loss line each step."""
    from nemo_tst.recipes.catalog import load_recipe

    recipe = load_recipe("tst_tiny", gpus=1, overrides=[
        "cpu=true", f"data.prefix={data['train_prefix'].removesuffix('_train')}",
        f"data.tokenizer={data['tokenizer']}", f"model.vocab_size={data['vocab_size']}",
        "model.ffn_hidden_size=128", "model.seq_length=32", "parallel.micro_batch_size=2",
        "training.global_batch_size=4", f"training.train_iters={N}", f"training.lr={LR}",
        f"training.min_lr={MIN_LR}", f"training.warmup_iters={WARMUP}",
        f"training.decay_fraction={DECAY / N}",
        "training.weight_decay=0.0", "training.eval_iters=1", "training.eval_interval=5",
        "training.log_interval=1", f"training.save_interval={SAVE_INTERVAL}", "tst.bag_size=4",
        f"tst.phase1_fraction={N1 / N}",
    ])
    return [*recipe.megatron_args(), "--test-data-path", data["valid_prefix"]]


def pretrain_cmd(save: Path, argv: list[str], nproc: int = 1) -> list[str]:
    return [sys.executable, "-m", "nemo_tst.cli", "pretrain", "--nproc-per-node", str(nproc),
            "--save", str(save), *argv]


def run_pretrain(save: Path, argv: list[str], nproc: int = 1, env=None):
    """`nemo-tst pretrain` once; (parsed trainer log, its text) of this call, read from the
    full log in SAVE/train.log (the terminal shows only the progress lines)."""
    log_path = save.parent / f"{save.name}.log"
    full = save / "train.log"
    offset = full.stat().st_size if full.exists() else 0
    with open(log_path, "a") as log:
        proc = subprocess.run(pretrain_cmd(save, argv, nproc), stdout=log, stderr=subprocess.STDOUT,
                              env=None if env is None else dict(os.environ, **env))
    assert proc.returncode == 0, log_path.read_text()[-4000:]
    with open(full, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    return parse_training_log(text), text


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from nemo_tst.demo import prepare_stdlib_data

    return prepare_stdlib_data(tmp_path_factory.mktemp("data"), max_bytes=300_000, vocab_size=512)


@pytest.fixture(scope="module")
def seed_checkpoint(data, tmp_path_factory):
    """Initial weights every run loads (--pretrained-checkpoint), so that PP=2, whose stages
    Megatron seeds differently, starts from the same model as world size 1. A one-iteration
    phase-1 run: Megatron's first update runs at the warm-up's LR of 0, so this is the init."""
    save = tmp_path_factory.mktemp("seed") / "run"
    argv = tiny_args(data) + ["--train-iters", "2", "--lr-warmup-iters", "1",
                              "--lr-wsd-decay-iters", "1", "--tst-phase", "1"]
    run_pretrain(save, argv)
    return save / "phase1"


@pytest.fixture(scope="module")
def reference(data, seed_checkpoint, tmp_path_factory):
    """The uninterrupted world-size-1 run every other run is compared with."""
    save = tmp_path_factory.mktemp("reference") / "run"
    argv = tiny_args(data) + ["--pretrained-checkpoint", str(seed_checkpoint)]
    log, text = run_pretrain(save, argv)
    return {"save": save, "argv": argv, "log": log, "text": text}


def test_phase2_resumes_phase1_state_with_one_schedule(reference):
    log, text = reference["log"], reference["text"]
    assert sorted(log.train) == list(range(1, N + 1))
    for it in range(1, N + 1):
        phase = 1 if it <= N1 else 2
        assert log.phase[it] == phase
        assert ("tst loss" in log.train[it]) == (phase == 1)
        assert ("tst loss t+4" in log.train[it]) == (phase == 1)
    # Phase 2 is a resume of phase 1's last checkpoint, not a fine-tune.
    assert re.search(rf"successfully loaded checkpoint from \S*/phase1 .* at iteration {N1}\b", text)
    assert "not loading optimizer" not in text.lower()
    # One WSD schedule over both phases: warm-up, flat through the handoff, linear decay at the end.
    assert [log.train[it]["learning rate"] for it in range(1, N + 1)] == pytest.approx(
        [wsd_learning_rate(it) for it in range(1, N + 1)], rel=1e-6
    )
    # Text flows s times faster in phase 1: 4 * 32 tokens per sample vs 32.
    assert log.text_tokens[N1] == N1 * 4 * 4 * 32
    assert log.text_tokens[N] == log.text_tokens[N1] + (N - N1) * 4 * 32
    # Checkpoints: phase 1's handoff is kept in its own directory; phase 2 never writes there.
    save = reference["save"]
    assert (save / "phase1" / "latest_checkpointed_iteration.txt").read_text().strip() == str(N1)
    assert (save / "phase2" / "latest_checkpointed_iteration.txt").read_text().strip() == str(N)
    assert log.valid and all(math.isfinite(v) for v in log.valid.values())


def losses(log):
    return [log.loss(it) for it in range(1, N + 1)]


@pytest.mark.parametrize("parallel", [["--tensor-model-parallel-size", "2"],
                                      ["--pipeline-model-parallel-size", "2"]],
                         ids=["tp2", "pp2"])
def test_model_parallel_runs_match_world_size_1(reference, parallel, tmp_path):
    log, _ = run_pretrain(tmp_path / "run", reference["argv"] + parallel, nproc=2)
    assert losses(log) == pytest.approx(losses(reference["log"]), rel=2e-5)


# (where the crash lands, the environment that injects it, the directory and iteration of the
# last complete checkpoint it leaves)
FAULTS = {
    "early phase 1": ({"NEMO_TST_KILL_AT": "3"}, "phase1", 2),
    "during phase 1's handoff save": ({"NEMO_TST_KILL_IN_SAVE_AT": str(N1)}, "phase1", 2),
    "after phase 1, before phase 2's first step": ({"NEMO_TST_KILL_AT": str(N1 + 1)}, "phase1", N1),
    "mid phase 2": ({"NEMO_TST_KILL_AT": "7"}, "phase2", 6),
    "during the final save": ({"NEMO_TST_KILL_IN_SAVE_AT": str(N)}, "phase2", N - SAVE_INTERVAL),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_killed_run_resumes_to_the_same_losses(reference, tmp_path, fault):
    """SIGKILL at a chosen point, then the same command again: every remaining iteration, and
    the final held-out loss, equal the uninterrupted run's."""
    inject, phase_dir, last_saved = FAULTS[fault]
    save = tmp_path / "run"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.run(pretrain_cmd(save, reference["argv"]), stdout=log,
                              stderr=subprocess.STDOUT, env=dict(os.environ, **inject))
    killed_text = (tmp_path / "killed.log").read_text()
    assert proc.returncode != 0 and "Rerun the same command" in killed_text
    latest = (save / phase_dir / "latest_checkpointed_iteration.txt").read_text().strip()
    assert int(latest) == last_saved  # a checkpoint cut short is never the latest

    log, _ = run_pretrain(save, reference["argv"])
    ref = reference["log"]
    resumed = sorted(log.train)
    assert resumed[0] == last_saved + 1 and resumed[-1] == N
    assert [log.loss(it) for it in resumed] == pytest.approx([ref.loss(it) for it in resumed], rel=1e-6)
    assert log.valid[N] == ref.valid[N]
    # The handoff checkpoint survives every fault.
    assert (save / "phase1" / "latest_checkpointed_iteration.txt").read_text().strip() == str(N1)


def test_sigterm_saves_and_the_next_phase_waits_for_a_finished_one(reference, tmp_path):
    """SIGTERM with Megatron's --exit-signal-handler: a checkpoint at that iteration, exit 0
    from the trainer, and the driver refuses to call the phase finished."""
    save = tmp_path / "run"
    argv = reference["argv"] + ["--exit-signal-handler"]
    env = dict(os.environ, NEMO_TST_KILL_AT="5", NEMO_TST_KILL_SIGNAL="TERM")
    with open(tmp_path / "terminated.log", "w") as log:
        proc = subprocess.run(pretrain_cmd(save, argv), stdout=log, stderr=subprocess.STDOUT, env=env)
    text = (tmp_path / "terminated.log").read_text()
    assert proc.returncode != 0 and "phase 2 stopped at iteration 5 before its end (10)" in text
    assert (save / "phase2" / "latest_checkpointed_iteration.txt").read_text().strip() == "5"

    log, _ = run_pretrain(save, argv)
    ref = reference["log"]
    assert sorted(log.train) == list(range(6, N + 1))
    assert [log.loss(it) for it in range(6, N + 1)] == pytest.approx([ref.loss(it) for it in range(6, N + 1)], rel=1e-6)
    assert log.valid[N] == ref.valid[N]


def test_non_finite_loss_stops_naming_step_and_phase_and_keeps_the_last_good_checkpoint(reference, tmp_path):
    save = tmp_path / "run"
    with open(tmp_path / "nan.log", "w") as log:
        proc = subprocess.run(pretrain_cmd(save, reference["argv"]), stdout=log,
                              stderr=subprocess.STDOUT, env=dict(os.environ, NEMO_TST_NAN_AT="6"))
    text = (tmp_path / "nan.log").read_text()
    assert proc.returncode != 0
    # The driver's own error names the step and the phase (Megatron's check raised it).
    assert re.search(r"nemo-tst pretrain: error: phase 2 crashed during training .*non-finite TST phase-2 loss "
                     r"at iteration 6", text), text[-3000:]
    bad_iteration = 6
    # Every complete checkpoint precedes the bad step (Megatron's rerun machine saves the state
    # before it): nothing non-finite was saved.
    for phase_dir in ("phase1", "phase2"):
        tracker = save / phase_dir / "latest_checkpointed_iteration.txt"
        if tracker.exists():
            assert int(tracker.read_text()) < bad_iteration


VANILLA_LOGITS = r'''
import os, sys, torch, torch.distributed as dist
# Plain megatron-core on a CPU machine: RoPE asks for the current CUDA device. No nemo_tst import.
torch.cuda.current_device = lambda: torch.device("cpu")
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3])
dist.init_process_group("gloo", rank=0, world_size=1)
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
parallel_state.initialize_model_parallel(1, 1)
from megatron.core.tensor_parallel.random import initialize_rng_tracker
initialize_rng_tracker(inference_rng_tracker=True)  # no CUDA RNG state to fork on a CPU machine
vocab = int(sys.argv[2])
config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
    normalization="RMSNorm", gated_linear_unit=True, activation_func=torch.nn.functional.silu,
    add_bias_linear=False, use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
    bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
    persist_layer_norm=False, gradient_accumulation_fusion=False)
model = GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab, 32,
    position_embedding_type="rope", share_embeddings_and_output_weights=False)
sharded = model.sharded_state_dict(metadata={"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)})
loaded = dist_checkpointing.load({"model": sharded}, sys.argv[1])
model.load_state_dict(loaded["model"], strict=True)
ids = torch.arange(64).remainder(vocab).view(2, 32)
mask = torch.triu(torch.ones(1, 1, 32, 32, dtype=torch.bool), diagonal=1)
with torch.no_grad():
    logits = model(ids, torch.arange(32).expand(2, 32), mask)
torch.save({"logits": logits, "tst_modules": sorted(m for m in sys.modules if m.startswith("nemo_tst"))}, sys.argv[4])
'''


def test_final_checkpoint_loads_into_vanilla_gpt(reference, data, tmp_path):
    """No TST code on the path: megatron-core's GPTModel loads the last checkpoint and gives the
    logits the trained TST model gives."""
    from tests.distributed import free_port

    ckpt = reference["save"] / "phase2" / f"iter_{N:07d}"
    script = tmp_path / "vanilla.py"
    script.write_text(VANILLA_LOGITS)
    out = tmp_path / "vanilla.pt"
    proc = subprocess.run(
        [sys.executable, str(script), str(ckpt), str(reference_vocab(reference)), str(free_port()), str(out)],
        capture_output=True, text=True, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=""),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    import torch

    vanilla = torch.load(out)
    assert vanilla["tst_modules"] == []

    tst_logits = _tst_model_logits(ckpt, reference_vocab(reference))
    assert torch.equal(vanilla["logits"], tst_logits)


def reference_vocab(reference) -> int:
    """The padded vocabulary Megatron built the model with (from its argument dump)."""
    m = re.search(r"padded vocab \(size: \d+\) with \d+ dummy tokens \(new size: (\d+)\)", reference["text"])
    return int(m.group(1))


def _tst_model_logits(ckpt: Path, vocab: int):
    """The trained model as the trainer holds it: a TSTGPTModel in phase 2, same checkpoint."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from nemo_tst import TSTGPTModel
    from tests.distributed import free_port, init_megatron_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1)
    init_megatron_parallel()
    config = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, use_cpu_initialization=True, hidden_dropout=0.0,
        attention_dropout=0.0, bias_dropout_fusion=False, apply_rope_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
    )
    model = TSTGPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab, 32,
                        position_embedding_type="rope", share_embeddings_and_output_weights=False)
    sharded = model.sharded_state_dict(
        metadata={"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    )
    loaded = dist_checkpointing.load({"model": sharded}, str(ckpt))
    model.load_state_dict(loaded["model"], strict=True)
    ids = torch.arange(64).remainder(vocab).view(2, 32)
    mask = torch.triu(torch.ones(1, 1, 32, 32, dtype=torch.bool), diagonal=1)
    with torch.no_grad():
        return model(ids, torch.arange(32).expand(2, 32), mask)


def test_baseline_is_one_launch_resumes_and_shows_only_progress_lines(data, tmp_path):
    """s = 1: all N iterations in one launch (in SAVE/phase2), killed mid-way the same command
    finishes it with the uninterrupted run's losses; the terminal shows the per-interval lines,
    not Megatron's argument dump, which is in SAVE/train.log."""
    argv = tiny_args(data)
    argv[argv.index("--tst-bag-size") + 1] = "1"
    save = tmp_path / "whole"
    log, text = run_pretrain(save, argv)
    terminal = (tmp_path / "whole.log").read_text()
    assert sorted(log.train) == list(range(1, N + 1)) and sorted(log.valid) == [5, 10]
    assert terminal.count("[nemo-tst] phase") == 1 and "[nemo-tst] phase 2 (iterations 1-10;" in terminal
    assert not (save / "phase1").exists()
    assert (save / "phase2" / "latest_checkpointed_iteration.txt").read_text().strip() == str(N)
    assert "iteration       10/      10 |" in terminal and "validation loss at iteration 10" in terminal
    assert "arguments ---" not in terminal and "UserWarning" not in terminal
    assert "------------------------ arguments ------------------------" in text
    assert "trainer output: " + str(save / "train.log") in terminal

    killed = tmp_path / "killed"
    with open(tmp_path / "killed.out", "w") as out:
        proc = subprocess.run(pretrain_cmd(killed, argv), stdout=out, stderr=subprocess.STDOUT,
                              env=dict(os.environ, NEMO_TST_KILL_AT="7"))
    assert proc.returncode != 0 and "Rerun the same command" in (tmp_path / "killed.out").read_text()
    assert (killed / "phase2" / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    resumed, _ = run_pretrain(killed, argv)
    assert (tmp_path / "killed.log").read_text().count("[nemo-tst] phase 2 (iterations 7-10;") == 1
    assert sorted(resumed.train) == list(range(7, N + 1))
    assert [resumed.loss(it) for it in range(7, N + 1)] == pytest.approx([log.loss(it) for it in range(7, N + 1)], rel=1e-6)
    assert resumed.valid[N] == log.valid[N]

    # --tst-phase 1 has nothing to run at s = 1, and says so; phase 2 then finds the run done.
    again = subprocess.run(pretrain_cmd(killed, argv + ["--tst-phase", "1"]), capture_output=True, text=True)
    assert again.returncode == 0 and "there is no superposition phase" in again.stdout
    assert "[nemo-tst] phase" not in again.stdout


def test_weighted_blend_of_corpora_trains_both_phases(data, tmp_path):
    """`--train-data-path W1 A W2 B` (Megatron's weighted blend) through both phases."""
    argv = tiny_args(data)
    i = argv.index("--train-data-path")
    argv[i:i + 2] = ["--train-data-path", "0.7", data["train_prefix"], "0.3", data["valid_prefix"]]
    log, _ = run_pretrain(tmp_path / "run", argv)
    assert sorted(log.train) == list(range(1, N + 1))
    assert {log.phase[it] for it in log.train} == {1, 2}


# ------------------------------------------------------------------------------------------
# Damaged checkpoints: the rerun falls back to the newest complete one of the same phase
# ------------------------------------------------------------------------------------------


def _stopped_copy(reference, tmp_path, *, phase2_upto):
    """A copy of the reference run as it was when phase 2 had saved up to `phase2_upto`
    (None: phase 2 never started), i.e. a run stopped there."""
    import shutil

    save = tmp_path / "run"
    shutil.copytree(reference["save"], save)
    p2 = save / "phase2"
    if phase2_upto is None:
        shutil.rmtree(p2)
    else:
        for path in p2.glob("iter_*"):
            if int(path.name[5:]) > phase2_upto:
                shutil.rmtree(path)
        (p2 / "latest_checkpointed_iteration.txt").write_text(str(phase2_upto))
    return save


def _damage(checkpoint: Path, kind: str) -> None:
    """Damage the checkpoint (an iter_NNNNNNN directory) or its directory's tracker."""
    if kind == "truncated file":
        data = next(checkpoint.glob("*.distcp"))
        with open(data, "r+b") as f:
            f.truncate(data.stat().st_size // 2)
    elif kind == "deleted file":
        next(checkpoint.glob("*.distcp")).unlink()
    elif kind == "missing metadata (common state)":
        (checkpoint / ".metadata").unlink()  # megatron-core 0.19 keeps the common state there
    elif kind == "garbage tracker":
        (checkpoint.parent / "latest_checkpointed_iteration.txt").write_text("#@!garbage")
    else:
        raise AssertionError(kind)


KINDS = ["truncated file", "deleted file", "missing metadata (common state)", "garbage tracker"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("phase", [1, 2])
def test_damaged_latest_checkpoint_is_found_and_an_earlier_one_chosen(reference, tmp_path, phase, kind):
    """Each kind of damage, in each phase: the driver's check names it and picks the newest
    complete checkpoint of the same phase (or, in phase 2 with none, the handoff), without
    touching anything until the run goes ahead."""
    from nemo_tst.core import run_dir
    from nemo_tst.training.arguments import MEGATRON_NAMES, plan_from_args
    from nemo_tst.training.arguments import parse_megatron_args

    save = _stopped_copy(reference, tmp_path, phase2_upto=None if phase == 1 else 6)
    latest = save / f"phase{phase}" / f"iter_{(N1 if phase == 1 else 6):07d}"
    _damage(latest, kind)
    plan = plan_from_args(parse_megatron_args(reference["argv"] + ["--save", str(save)]))
    before = sorted(str(p) for p in save.rglob("*"))
    fixes = run_dir.damaged_checkpoint_fallbacks(save, plan, MEGATRON_NAMES)
    assert sorted(str(p) for p in save.rglob("*")) == before  # a check changes nothing
    [(directory, iteration, problems)] = fixes
    assert directory == save / f"phase{phase}"
    want = 2 if phase == 1 else 4  # the save before (SAVE_INTERVAL = 2)
    if kind == "garbage tracker":
        want = N1 if phase == 1 else 6  # the tracked checkpoint is intact: the newest complete
    assert iteration == want, problems
    assert problems and all(str(save) in p for p in problems)


@pytest.mark.parametrize("case", ["phase 1, truncated file", "phase 2, garbage tracker",
                                  "phase 2, only damaged checkpoints: back to the handoff"])
def test_rerun_after_damage_finishes_with_the_undamaged_runs_losses(reference, tmp_path, case):
    """The rerun warns, names what it skipped, keeps the damaged files (renamed), and finishes
    the plan with the same losses and final held-out loss as the undamaged run."""
    if case.startswith("phase 1"):
        save = _stopped_copy(reference, tmp_path, phase2_upto=None)
        _damage(save / "phase1" / f"iter_{N1:07d}", "truncated file")
        first, damaged = N1, save / "phase1" / f"iter_{N1:07d}.damaged"
    elif case.startswith("phase 2, garbage"):
        save = _stopped_copy(reference, tmp_path, phase2_upto=8)
        _damage(save / "phase2" / "iter_0000008", "garbage tracker")
        first, damaged = 9, save / "phase2" / "latest_checkpointed_iteration.txt.damaged"
    else:
        save = _stopped_copy(reference, tmp_path, phase2_upto=4)
        _damage(save / "phase2" / "iter_0000004", "missing metadata (common state)")
        first, damaged = N1 + 1, save / "phase2" / "iter_0000004.damaged"
    log, _ = run_pretrain(save, reference["argv"])
    said = (save.parent / "run.log").read_text()
    assert "WARNING: the latest checkpoint in" in said and "is damaged" in said, said[-3000:]
    assert damaged.exists()  # kept, under another name: nothing deleted
    ref = reference["log"]
    resumed = sorted(log.train)
    assert resumed[0] == first and resumed[-1] == N
    assert [log.loss(it) for it in resumed] == pytest.approx([ref.loss(it) for it in resumed], rel=1e-6)
    assert log.valid[N] == ref.valid[N]
    # The handoff survives: phase 1's final checkpoint is complete and tracked.
    assert (save / "phase1" / "latest_checkpointed_iteration.txt").read_text().strip() == str(N1)
    assert (save / "phase1" / f"iter_{N1:07d}").is_dir()


# ------------------------------------------------------------------------------------------
# One run per directory
# ------------------------------------------------------------------------------------------


def test_a_second_run_on_the_same_directory_refuses_naming_the_holder(reference, tmp_path):
    """Two real `nemo-tst pretrain` processes, one --save: the second refuses (host, pid, since
    when) while the first trains; the lock goes with the holder however it ends."""
    import signal
    import socket
    import time

    from nemo_tst.core.run_dir import LOCK, RunLock
    from nemo_tst.training.arguments import MEGATRON_NAMES

    save = tmp_path / "run"
    argv = reference["argv"] + ["--train-iters", "5000"]  # still training when the second comes
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(pretrain_cmd(save, argv), stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        deadline = time.time() + 300
        while not ((save / LOCK).is_file() and (save / LOCK).read_text()) and first.poll() is None:
            assert time.time() < deadline, "the first run never took the lock"
            time.sleep(0.5)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        second = subprocess.run(pretrain_cmd(save, argv), capture_output=True, text=True, timeout=300)
        assert second.returncode == 1, second.stderr
        assert "is in use by another run" in second.stderr
        assert f"pid {first.pid} on host {socket.gethostname()}, since" in second.stderr
        assert "[nemo-tst] phase" not in second.stdout
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the holder dies without releasing anything
        first.wait()
    RunLock(save).acquire(MEGATRON_NAMES).release()  # the OS released it with the holder


# ------------------------------------------------------------------------------------------
# Data parallel with the distributed optimizer, parameters all-gathered during the forward
# ------------------------------------------------------------------------------------------


def tiny_recipe_argv(data: dict, save: Path, *overrides: str) -> list[str]:
    """The `tst_tiny` recipe for two ranks on this data: 10 iterations, phase 1 the first 5,
    a loss line each iteration."""
    from nemo_tst.recipes.catalog import load_recipe

    recipe = load_recipe("tst_tiny", gpus=2, overrides=[
        "cpu=true", f"data.prefix={data['train_prefix'].removesuffix('_train')}",
        f"data.tokenizer={data['tokenizer']}", f"model.vocab_size={data['vocab_size']}",
        "model.seq_length=32", "training.train_iters=10", "tst.phase1_fraction=0.5",
        "training.log_interval=1", f"run_dir={save}", *overrides,
    ])
    return [str(a) for a in recipe.megatron_args()]


def test_phase1_with_overlapped_param_gather_trains_as_with_synchronous_gather(data, tmp_path):
    """DP=2, s = 4, --use-distributed-optimizer --overlap-param-gather: each rank updates its
    shard and the next forward waits, module by module in DDP's forward pre-hooks, for the
    all-gather of the rest. Phase 1 embeds through the table's own hook, so no rank embeds with
    a stale shard: every loss is the one of the same run with a synchronous all-gather after
    each step, and the replicas are equal (Megatron's weight-hash check).

    The hash check runs at the last iteration only: Megatron gathers synchronously before each
    check, which would hide a stale read in the forward that follows."""
    common = ["--use-distributed-optimizer", "--check-weight-hash-across-dp-replicas-interval", "5",
              "--tst-phase", "1"]
    overlapped, text = run_pretrain(
        tmp_path / "overlapped",
        tiny_recipe_argv(data, tmp_path / "overlapped") + common
        + ["--overlap-grad-reduce", "--overlap-param-gather"],
        nproc=2,
    )
    synchronous, _ = run_pretrain(tmp_path / "synchronous",
                                  tiny_recipe_argv(data, tmp_path / "synchronous") + common, nproc=2)
    assert sorted(overlapped.train) == sorted(synchronous.train) == [1, 2, 3, 4, 5]
    assert {overlapped.phase[it] for it in overlapped.train} == {1}
    assert ">>> Weight hashes match after 5 iterations" in text
    assert [overlapped.loss(it) for it in range(1, 6)] == pytest.approx(
        [synchronous.loss(it) for it in range(1, 6)], rel=1e-6
    )


def test_distributed_optimizer_resumes_across_the_handoff_like_the_plain_optimizer(data, tmp_path):
    """DP=2 with --use-distributed-optimizer through both phases: phase 2 resumes phase 1's
    sharded optimizer state (megatron_fixes mends that resume without Apex or Transformer
    Engine: before the first step there is no per-parameter state to load into, and Adam's
    step must be each parameter's own), so every loss equals the same run with Megatron's plain
    optimizer, whose state is not sharded."""
    sharded, _ = run_pretrain(tmp_path / "sharded",
                              tiny_recipe_argv(data, tmp_path / "sharded") + ["--use-distributed-optimizer"],
                              nproc=2)
    plain, _ = run_pretrain(tmp_path / "plain", tiny_recipe_argv(data, tmp_path / "plain"), nproc=2)
    assert sorted(sharded.train) == sorted(plain.train) == list(range(1, 11))
    assert {sharded.phase[it] for it in sharded.train} == {1, 2}
    assert [sharded.loss(it) for it in range(1, 11)] == pytest.approx(
        [plain.loss(it) for it in range(1, 11)], rel=1e-5
    )
