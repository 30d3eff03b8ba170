"""The driver's launch plan without launching: which phases run, where each rank starts, how a
launch is started. No training here."""

from pathlib import Path

import pytest

from nemo_tst.core.plan import run_phases
from nemo_tst.recipes.catalog import load_recipe
from nemo_tst.training.arguments import parse_megatron_args, plan_from_args
from nemo_tst.training.argv import phase_argv
from nemo_tst.training.driver import launch_command, phase_commands, resolve_phase_start

N, N1 = 10, 3


def argv_for(save: Path, s: int, *extra: str) -> list[str]:
    """The `tst_tiny` recipe as a run of N iterations at s saved in `save` (phase 1: r = 0.3)."""
    recipe = load_recipe("tst_tiny", gpus=1, overrides=[
        f"training.train_iters={N}", f"tst.bag_size={s}", "tst.phase1_fraction=0.3", f"run_dir={save}"])
    return [*recipe.megatron_args(), *extra]


def checkpoint(directory: Path, iteration: int) -> None:
    """A checkpoint as the run-directory checks see one: the tracker and a rank's (legacy
    torch-format) file that is not empty."""
    rank_file = directory / f"iter_{iteration:07d}" / "mp_rank_00" / "model_optim_rng.pt"
    rank_file.parent.mkdir(parents=True, exist_ok=True)
    rank_file.write_bytes(b"weights")
    (directory / "latest_checkpointed_iteration.txt").write_text(str(iteration))


def commands(save: Path, s: int, *extra: str):
    argv = argv_for(save, s, *extra)
    args = parse_megatron_args(argv)
    return phase_commands(argv, args, plan_from_args(args))


def rank_start(save: Path, s: int, phase: int):
    """What a rank of `phase` does (resolve_phase_start) with the arguments the driver gives it."""
    argv = phase_argv(argv_for(save, s), phase, save, N1)
    args = parse_megatron_args(argv)
    message = resolve_phase_start(args, plan_from_args(args))
    return message, Path(args.load)


def test_s1_is_one_launch_of_the_whole_run(tmp_path):
    assert run_phases(plan_from_args(parse_megatron_args(argv_for(tmp_path, 1)))) == (2,)
    assert run_phases(plan_from_args(parse_megatron_args(argv_for(tmp_path, 4)))) == (1, 2)
    assert [p for p, _ in commands(tmp_path, 1)] == [2]
    assert [p for p, _ in commands(tmp_path, 1, "--tst-phase", "2")] == [2]
    assert commands(tmp_path, 1, "--tst-phase", "1") == []  # no superposition phase to run
    assert [p for p, _ in commands(tmp_path, 4)] == [1, 2]
    checkpoint(tmp_path / "phase2", N)
    assert commands(tmp_path, 1) == []  # finished


def test_s1_rank_starts_at_zero_or_resumes(tmp_path):
    message, load = rank_start(tmp_path, 1, 2)
    assert message is None and load == tmp_path / "phase2"  # iteration 0 (nothing to load yet)
    message, _ = rank_start(tmp_path, 1, 1)
    assert "--tst-phase 1 with --tst-bag-size 1" in message and "nothing to do" in message
    checkpoint(tmp_path / "phase2", 6)
    message, load = rank_start(tmp_path, 1, 2)
    assert message is None and load == tmp_path / "phase2"
    checkpoint(tmp_path / "phase2", N)
    assert "phase 2 is complete" in rank_start(tmp_path, 1, 2)[0]


def test_s4_phase2_still_needs_the_handoff(tmp_path):
    with pytest.raises(ValueError, match="phase 2 starts from phase 1's checkpoint of iteration 3"):
        rank_start(tmp_path, 4, 2)
    with pytest.raises(ValueError, match="phase 2 needs phase 1's checkpoint"):
        commands(tmp_path, 4, "--tst-phase", "2")


def test_one_process_runs_the_rank_without_torchrun():
    cmd, env = launch_command(1, ["--x"])
    assert cmd[1:4] == ["-m", "nemo_tst.training.pretrain", "--x"] and "torch.distributed.run" not in cmd
    assert env["RANK"] == env["LOCAL_RANK"] == "0" and env["WORLD_SIZE"] == "1"
    assert env["MASTER_ADDR"] == "127.0.0.1" and int(env["MASTER_PORT"]) > 0
    cmd, env = launch_command(2, ["--x"])
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--nproc-per-node=2" in cmd and env == {}
    assert cmd[-3:] == ["-m", "nemo_tst.training.pretrain", "--x"] or cmd[-2:] == ["nemo_tst.training.pretrain", "--x"]


LINE = (" [2026-12-01 10:00:00] iteration      {it:>3}/     100 | consumed samples: 16 | "
        "learning rate: 1.000000E-03 | {key}: {loss:.6E} | loss scale: 1.0 |\n")




def test_a_release_checkpoint_is_not_taken_for_a_damaged_one(tmp_path):
    """Megatron's tracker "release" names DIR/release/, not iter_0000000."""
    from nemo_tst.core.run_dir import usable_checkpoint

    rank_file = tmp_path / "release" / "mp_rank_00" / "model_optim_rng.pt"
    rank_file.parent.mkdir(parents=True)
    rank_file.write_bytes(b"weights")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release")
    assert usable_checkpoint(tmp_path) == (0, [])
    rank_file.write_bytes(b"")
    assert usable_checkpoint(tmp_path)[1] == [f"{rank_file} is empty"]


def test_only_global_rank_0_reads_checkpoint_metadata(tmp_path, monkeypatch):
    """Every rank of a stage resolves its start; only global rank 0 reads the checkpoint's
    metadata (a damaged one stops it, and the launcher ends the others)."""
    from nemo_tst.core import run_dir

    checkpoint(tmp_path / "phase1", 2)  # phase 1 resumes from iteration 2 ...
    (tmp_path / "phase1" / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt").write_bytes(b"")
    reads = []
    real = run_dir.checkpoint_problem
    monkeypatch.setattr(run_dir, "checkpoint_problem", lambda *a, **k: reads.append(a) or real(*a, **k))
    monkeypatch.setenv("RANK", "1")
    message, load = rank_start(tmp_path, 4, 1)
    assert message is None and load == tmp_path / "phase1" and reads == []
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="is damaged .*model_optim_rng.pt is empty"):
        rank_start(tmp_path, 4, 1)
    assert reads


def test_a_cpu_rank_that_sees_a_gpu_refuses(monkeypatch):
    """--tst-cpu beside a visible CUDA GPU would run the CPU stand-ins next to a real CUDA
    runtime: the rank refuses in one line; `nemo-tst pretrain --tst-cpu` hides the GPUs."""
    import torch

    from nemo_tst.training import pretrain

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match="--tst-cpu runs Megatron on CPU, but this rank sees a CUDA GPU"):
        pretrain._enable_cpu_if_requested(["--tst-cpu"])
    pretrain._enable_cpu_if_requested([])  # a GPU run: nothing to refuse


def test_cpu_runs_hide_the_gpus_from_their_ranks(tmp_path, monkeypatch):
    """The environment a `--tst-cpu` launch gives its ranks has no visible GPU."""
    from nemo_tst.training import driver

    seen = {}

    def launch(cmd, env, sink, on_line=None):
        seen["env"] = env
        return 1, ["stopped here"], False

    monkeypatch.setattr(driver, "_run_and_tee", launch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    args = parse_megatron_args(argv_for(tmp_path, 4, "--tst-cpu"))
    plan = plan_from_args(args)
    with pytest.raises(RuntimeError, match="phase 1 failed before training started"):
        driver._launch_phases(phase_commands(argv_for(tmp_path, 4, "--tst-cpu"), args, plan), plan,
                              tmp_path, 1, tmp_path / "log", None, lambda text: None, None, args)
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == ""
    args = parse_megatron_args(argv_for(tmp_path, 4))
    with pytest.raises(RuntimeError):
        driver._launch_phases(phase_commands(argv_for(tmp_path, 4), args, plan), plan, tmp_path, 1,
                              tmp_path / "log", None, lambda text: None, None, args)
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "0,1"  # a GPU run keeps the user's choice


def test_a_run_directory_belongs_to_its_hybrid_layer_pattern(tmp_path):
    """A hybrid run's layer pattern is part of what its directory holds: another pattern
    (even of the same length) is another model, refused before launch, not at load."""
    from nemo_tst.core.run_dir import RunDirectory
    from nemo_tst.training.arguments import MEGATRON_NAMES
    from nemo_tst.training.driver import claim_run_directory, run_identity

    def check_run_directory_for(save, args, plan):
        RunDirectory(save).check(run_identity(args, plan), MEGATRON_NAMES)

    args = parse_megatron_args(argv_for(tmp_path, 4, "--hybrid-layer-pattern", "*-*-"))
    claim_run_directory(tmp_path, args, plan_from_args(args))
    checkpoint(tmp_path / "phase1", 2)
    check_run_directory_for(tmp_path, args, plan_from_args(args))  # the same run: resumes
    other = parse_megatron_args(argv_for(tmp_path, 4, "--hybrid-layer-pattern", "**--"))
    with pytest.raises(ValueError, match=r"holds a different TST run \(hybrid_layer_pattern: '\*-\*-' there"):
        check_run_directory_for(tmp_path, other, plan_from_args(other))


def test_counting_tokens_from_two_threads_keeps_the_index_readers_lines_quiet(tmp_path):
    """The demo checks its two runs side by side, and `count_tokens` quiets the index reader's
    process-wide logger while it reads: the two threads must not restore each other's setting
    mid-read, or the reader's INFO lines reach the terminal."""
    import logging
    import sys
    import threading

    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from nemo_tst.training.driver import count_tokens

    prefix = str(tmp_path / "corpus")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for n in (5, 7, 11):
        builder.add_document(np.arange(n, dtype=np.int32), [n])
    builder.finalize(prefix + ".idx")

    class Records(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.seen = []

        def emit(self, record):
            self.seen.append(record.getMessage())

    reader_log = logging.getLogger("megatron.core.datasets.indexed_dataset")
    records, level = Records(), reader_log.level
    reader_log.addHandler(records)
    reader_log.setLevel(logging.INFO)  # as in the demo's process, where its INFO lines show
    counts, start = [], threading.Barrier(2)

    def count():
        start.wait()
        counts.extend(count_tokens([prefix]) for _ in range(100))

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, as two busy threads on two cores may
    try:
        threads = [threading.Thread(target=count) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        left_at = reader_log.level
    finally:
        sys.setswitchinterval(switch)
        reader_log.removeHandler(records)
        reader_log.setLevel(level)
    assert counts == [23] * 200
    assert records.seen == []
    assert left_at == logging.INFO  # each thread restored the level it found, not the other's
