"""What can be checked here of the container, the launch recipe and conf/ (no Docker engine)."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def dockerfile_instructions():
    lines = [ln.strip() for ln in (ROOT / "docker" / "Dockerfile").read_text().splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def test_dockerfile_base_image_is_a_build_argument_and_installs_this_package():
    instructions = dockerfile_instructions()
    assert instructions[0].startswith("ARG BASE_IMAGE=")
    assert instructions[1] == "FROM ${BASE_IMAGE}"
    copies = [ln.split()[1:-1] for ln in instructions if ln.startswith("COPY ")]
    for sources in copies:
        for src in sources:
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which the repository lacks"
    assert 'RUN pip install --no-cache-dir -e ".[plot]"' in instructions  # the package's own install
    assert instructions[-2] == 'ENTRYPOINT ["nemo-tst-entrypoint"]'
    assert "COPY docker/entrypoint.sh /usr/local/bin/nemo-tst-entrypoint" in instructions


def test_entrypoint_runs_the_cli_or_the_command_given(tmp_path):
    """`docker run IMAGE plan ...` is the CLI; `torchrun ...` (NeMo-Run's executors) runs as is."""
    entrypoint = ROOT / "docker" / "entrypoint.sh"
    fake = tmp_path / "nemo-tst"
    fake.write_text("#!/bin/sh\necho cli \"$@\"\n")
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    run = lambda *a: subprocess.run(["bash", str(entrypoint), *a], capture_output=True, text=True,  # noqa: E731
                                    env=env).stdout.strip()
    assert run("plan", "tst_tiny") == "cli plan tst_tiny"
    assert run() == "cli"
    assert run("echo", "torchrun", "-m", "x") == "torchrun -m x"


def test_recipe_script_parses_and_names_missing_settings():
    script = ROOT / "recipes" / "pretrain_gpt_tst.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0 and "set DATA" in proc.stderr


def test_slurm_script_parses_and_names_missing_settings():
    script = ROOT / "recipes" / "slurm_tst.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "RECIPE": "tst_tiny"})
    assert proc.returncode != 0 and "set ACCOUNT" in proc.stderr


def test_demo_sizes_come_from_conf():
    from nemo_tst.demo import load_sizes

    sizes = load_sizes()
    assert set(sizes) == {"ci", "cpu", "gpu"}
    keys = {"vocab", "layers", "hidden", "heads", "ffn", "seq", "mbs", "gbs", "iters", "lr",
            "warmup", "eval_interval", "eval_iters", "corpus_bytes", "side_by_side", "bag_size",
            "phase1_fraction"}
    for name, size in sizes.items():
        assert set(size) == keys, name
        assert size["gbs"] % size["mbs"] == 0 and size["hidden"] % size["heads"] == 0
        assert size["bag_size"] >= 2 and 0 < size["phase1_fraction"] < 1
