"""What can be checked here of the container, the launch recipe, pyproject.toml's package list
and the YAML of conf/ (no Docker engine)."""

import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_installs_every_package_and_conf_as_nemo_tst_conf():
    """The package list is written out (discovery cannot install conf/ as nemo_tst.conf): a
    package added to nemo_tst/ and left out of it would be missing from the wheel."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    in_tree = {init.parent.relative_to(ROOT).as_posix().replace("/", ".")
               for init in (ROOT / "nemo_tst").rglob("__init__.py")}
    assert setuptools["package-dir"] == {"nemo_tst.conf": "conf"}
    assert set(setuptools["packages"]) == in_tree | {"nemo_tst.conf", "nemo_tst.conf.recipes"}
    assert (ROOT / "conf" / "__init__.py").is_file() and not (ROOT / "nemo_tst" / "conf").exists()


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
    # The package's own install, not editable: its YAML travels as package data.
    assert 'RUN pip install --no-cache-dir ".[plot]"' in instructions
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
    """Each demo size names a recipe (model, schedule, the TST run's s and r) and keeps only
    what the demo alone needs; the ci size is the tst_tiny recipe the tests use."""
    from nemo_tst.demo import load_sizes, size_recipe
    from nemo_tst.recipes import check_recipe, recipe_names

    sizes = load_sizes()
    assert set(sizes) == {"ci", "cpu", "gpu"}
    assert sizes["ci"]["recipe"] == "tst_tiny"
    for name, size in sizes.items():
        assert set(size) == {"recipe", "corpus_bytes", "side_by_side"}, name
        assert size["recipe"] in recipe_names(), name
        recipe = size_recipe(name)
        assert recipe.parallel.num_gpus == 1, name  # one process: a CPU pair or one GPU
        _, plan = check_recipe(recipe, local=False)  # Megatron's parser + the recipe checks
        assert plan.superposition.bag_size >= 2 and 0 < recipe.tst.phase1_fraction < 1, name
        assert plan.phase1_iters < plan.train_iters, name
        assert size["corpus_bytes"] is None or size["corpus_bytes"] > 0, name
        assert isinstance(size["side_by_side"], bool), name
