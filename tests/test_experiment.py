"""NeMo-Run: the two-stage experiment. Slurm and Docker are dry-run (their generated sbatch
scripts and container commands are checked); the local executor runs end to end on CPU and
must train exactly what `nemo-tst pretrain` trains."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

pytest.importorskip("nemo_run", reason="NeMo-Run is the nemo extra: pip install nemo-tst[nemo]")

import fiddle as fdl  # noqa: E402  (comes with nemo_run)

from nemo_tst.cli import main  # noqa: E402
from nemo_tst.recipes import check_recipe, load_recipe, recipe_names  # noqa: E402
from nemo_tst.recipes.experiment import (  # noqa: E402
    add_phases,
    docker_executor,
    slurm_executor,
    two_phase_experiment,
)


@pytest.fixture(autouse=True)
def nemorun_home(tmp_path, monkeypatch):
    monkeypatch.setenv("NEMORUN_HOME", str(tmp_path / "nemo_run"))
    monkeypatch.setenv("COLUMNS", "1000")  # NeMo-Run's rich console: no wrapped lines
    # NeMo-Run's local tunnel runs shell commands through `invoke`, which forwards stdin.
    devnull = open(os.devnull)
    monkeypatch.setattr(sys, "stdin", devnull)
    yield tmp_path / "nemo_run"
    devnull.close()


def _argv_of(line: str) -> list[str]:
    return line.split()


@pytest.mark.parametrize("name", recipe_names())
def test_every_factory_dry_runs(name, tmp_path):
    rc = main(["run", "--factory", name, f"recipe.run_dir={tmp_path / 'run'}",
               "recipe.data.prefix=/data/corpus", "run.executor=slurm",
               "run.executor.account=acct", f"run.executor.job_dir={tmp_path / 'jobs'}",
               "--dryrun", "--yes"])
    assert rc == 0
    assert not (tmp_path / "run").exists()  # a dry run writes nothing to the run directory


def test_slurm_sbatch_for_the_moe_recipe_on_64_gpus(tmp_path):
    recipe = load_recipe("tst_qwen3_10b_a1b", gpus=64,
                         overrides=["run_dir=/lustre/ckpt/moe", "data.prefix=/lustre/data/mix"])
    executor = fdl.build(slurm_executor(account="acct", partition="batch", job_dir=str(tmp_path),
                                        container_image="registry/nemo-tst:0.1",
                                        container_mounts=["/lustre:/lustre"]))
    exp = two_phase_experiment(recipe, executor)
    with exp:
        add_phases(exp, recipe, check_recipe(recipe, local=False)[1])
        exp.dryrun(log=False, delete_exp_dir=False)
        jobs = {job.id: job for job in exp.jobs}
    assert jobs["phase1"].dependencies == [] and jobs["phase2"].dependencies == ["phase1"]
    assert jobs["phase2"].executor.dependency_type == "afterok"
    scripts = {p: (Path(exp._exp_dir) / f"{p}_sbatch.sh").read_text() for p in ("phase1", "phase2")}
    for phase, text in scripts.items():
        assert "#SBATCH --nodes=8" in text and "#SBATCH --gpus-per-node=8" in text
        assert "#SBATCH --account=acct" in text and "#SBATCH --partition=batch" in text
        assert "--container-image registry/nemo-tst:0.1" in text
        assert "/lustre:/lustre" in text
        launch = next(line for line in text.splitlines() if "torchrun" in line)
        argv = _argv_of(launch)
        assert argv[argv.index("--nnodes") + 1] == "8" and argv[argv.index("--nproc-per-node") + 1] == "8"
        assert argv[argv.index("-m") + 1] == "nemo_tst.training.pretrain"
        assert argv[argv.index("--expert-model-parallel-size") + 1] == "8"
        assert argv[argv.index("--tst-bag-size") + 1] == "16"
        assert argv[argv.index("--tst-phase1-iters") + 1] == "12483"
        assert argv[argv.index("--train-iters") + 1] == "49983"  # one schedule over both phases
        assert argv[argv.index("--tst-phase") + 1] == phase[-1]
    p1 = _argv_of(next(line for line in scripts["phase1"].splitlines() if "torchrun" in line))
    assert p1[p1.index("--save") + 1] == p1[p1.index("--load") + 1] == "/lustre/ckpt/moe/phase1"
    assert p1[p1.index("--exit-interval") + 1] == "12483"
    p2 = _argv_of(next(line for line in scripts["phase2"].splitlines() if "torchrun" in line))
    assert p2[p2.index("--save") + 1] == p2[p2.index("--load") + 1] == "/lustre/ckpt/moe/phase2"
    assert p2[p2.index("--tst-phase1-checkpoint") + 1] == "/lustre/ckpt/moe/phase1"
    assert "--exit-interval" not in p2


def test_a_baseline_recipe_is_one_stage(tmp_path):
    """tst.bag_size=1 has no superposition phase: one stage, phase 2, all N iterations."""
    recipe = load_recipe("tst_tiny", overrides=["run_dir=/ckpt/base", "data.prefix=/data/d", "tst.bag_size=1"])
    executor = fdl.build(slurm_executor(account="acct", partition="batch", job_dir=str(tmp_path)))
    exp = two_phase_experiment(recipe, executor)
    with exp:
        add_phases(exp, recipe, check_recipe(recipe, local=False)[1])
        exp.dryrun(log=False, delete_exp_dir=False)
        jobs = {job.id: job for job in exp.jobs}
    assert list(jobs) == ["phase2"] and jobs["phase2"].dependencies == []
    launch = next(line for line in (Path(exp._exp_dir) / "phase2_sbatch.sh").read_text().splitlines()
                  if "torchrun" in line)
    argv = _argv_of(launch)
    assert argv[argv.index("--tst-phase") + 1] == "2" and "--exit-interval" not in argv
    assert argv[argv.index("--save") + 1] == argv[argv.index("--load") + 1] == "/ckpt/base/phase2"


def test_docker_commands(tmp_path, capsys):
    recipe = load_recipe("tst_llama3_270m", gpus=8,
                         overrides=["run_dir=/ckpt/a", "data.prefix=/data/d", "precision=fp8_delayed"])
    executor = fdl.build(docker_executor(container_image="nemo-tst:test", volumes=["/data:/data"]))
    exp = two_phase_experiment(recipe, executor)
    with exp:
        add_phases(exp, recipe, check_recipe(recipe, local=False)[1])
        exp.dryrun(log=True, delete_exp_dir=True)
        jobs = {job.id: job for job in exp.jobs}
    assert jobs["phase2"].dependencies == ["phase1"]
    out = "\n".join(line.rstrip() for line in capsys.readouterr().out.splitlines()) + "\n"
    assert out.count("container_image: nemo-tst:test") >= 2 and "- /data:/data" in out
    assert "num_gpus: 8" in out and "ipc_mode: host" in out
    commands = re.findall(r"command:\n((?:\s+- .*\n)+)", out)
    assert len(commands) == 2
    for phase, block in zip(("1", "2"), commands):
        argv = [str(a) for a in yaml.safe_load(textwrap.dedent(block))]
        assert argv[0] == "torchrun" and argv[argv.index("-m") + 1] == "nemo_tst.training.pretrain"
        assert argv[argv.index("--nproc-per-node") + 1] == "8"
        assert argv[argv.index("--tst-phase") + 1] == phase
        assert argv[argv.index("--fp8-recipe") + 1] == "delayed"


def _losses(log_text: str) -> dict:
    from nemo_tst.training.logs import parse_training_log

    text = "\n".join(re.sub(r"^\[default\d+\]:", "", line) for line in log_text.splitlines())
    log = parse_training_log(text)
    return {it: log.loss(it) for it in log.train}


def test_local_two_stage_experiment_on_cpu_trains_what_pretrain_trains(tmp_path, nemorun_home):
    from nemo_tst.demo import prepare_stdlib_data

    data = prepare_stdlib_data(tmp_path / "data", max_bytes=400_000, vocab_size=512)
    overrides = [
        "recipe.cpu=true", f"recipe.data.prefix={tmp_path / 'data' / 'stdlib'}",
        f"recipe.data.tokenizer={data['tokenizer']}", "recipe.model.vocab_size=512",
        "recipe.training.train_iters=10", "recipe.training.eval_interval=5",
        "recipe.training.save_interval=5", "recipe.training.log_interval=1",
        "recipe.model.seq_length=32",
    ]
    cmd = [sys.executable, "-m", "nemo_tst.cli", "run", "--factory", "tst_tiny", *overrides,
           f"recipe.run_dir={tmp_path / 'run'}", "--yes"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from nemo_tst.training.driver import latest_iteration

    assert latest_iteration(tmp_path / "run" / "phase1") == 3  # r=0.3 of 10
    assert latest_iteration(tmp_path / "run" / "phase2") == 10
    logs = {p: "".join(f.read_text() for f in sorted(nemorun_home.rglob("combined.log"))
                       if f"/{p}/" in str(f)) for p in ("phase1", "phase2")}
    assert "successfully loaded checkpoint from " + str(tmp_path / "run" / "phase1") in logs["phase2"]
    via_nemo_run = {**_losses(logs["phase1"]), **_losses(logs["phase2"])}
    assert sorted(via_nemo_run) == list(range(1, 11))

    # The same recipe through `nemo-tst pretrain` (one driver, two torchrun launches).
    recipe = load_recipe("tst_tiny", overrides=[o.removeprefix("recipe.") for o in overrides]
                         + [f"run_dir={tmp_path / 'driver'}"])
    log_file = tmp_path / "driver.log"
    assert main(["pretrain", "--log-file", str(log_file), *recipe.megatron_args()]) == 0
    assert _losses(log_file.read_text()) == via_nemo_run  # the same training, bit for bit

    # Resubmitting the finished experiment resumes: both stages find nothing to do.
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    newest = max(nemorun_home.rglob("combined.log"), key=lambda f: f.stat().st_mtime)
    assert "nothing to do" in newest.read_text()
    assert latest_iteration(tmp_path / "run" / "phase2") == 10


def test_local_run_refuses_bad_input_before_launch(tmp_path, capsys):
    rc = main(["run", "--factory", "tst_tiny", "recipe.cpu=true", f"recipe.run_dir={tmp_path / 'run'}",
               f"recipe.data.prefix={tmp_path / 'nothing'}", "--yes"])
    assert rc != 0
    assert not (tmp_path / "run").exists()


def test_the_readme_slurm_example_runs_unattended_as_written(tmp_path):
    """README's `nemo-tst run ... --dryrun` for Slurm, exactly as printed there, with no one at
    the terminal (stdin closed): it must not stop at NeMo-Run's "Continue? [y/N]"."""
    import shlex

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index('nemo-tst run --factory "tst_qwen3_10b_a1b')
    end = readme.index("\n", readme.index("--dryrun", start))
    command = readme[start:end].replace("\\\n", " ").split("#", 1)[0]
    argv = shlex.split(command)
    assert argv[:2] == ["nemo-tst", "run"] and "--dryrun" in argv and "run.executor=slurm" in argv
    done = subprocess.run([sys.executable, "-m", "nemo_tst.cli", *argv[1:]], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env=dict(os.environ, NEMORUN_HOME=str(tmp_path / "nemo_run")))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "#SBATCH" in done.stdout + done.stderr
