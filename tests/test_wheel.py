"""The wheel: built from this tree, installed without it (no source checkout, no editable
install), its package data (the top-level conf/, installed as nemo_tst.conf) read by
`nemo-tst recipes`, `plan` and `demo` run from another directory."""

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What setuptools reads to build the wheel; copied so that the build writes nothing into this
# tree (build/, *.egg-info) and sees nothing but the package.
BUILD_INPUTS = ("pyproject.toml", "README.md", "nemo_tst", "conf", "setup.py", "setup.cfg",
                "MANIFEST.in", "LICENSE")


def _packaged_yaml() -> set[str]:
    """The YAML files of this tree's conf/, as wheel member names (nemo_tst/conf/...)."""
    return {"nemo_tst/" + path.relative_to(ROOT).as_posix() for path in (ROOT / "conf").rglob("*.yaml")}


def _can_build_without_isolation() -> bool:
    """setuptools new enough for pyproject.toml's build-system (>=77: `project.license` as an
    SPDX string), so the venv builds the wheel offline; else pip fetches it (build isolation)."""
    if importlib.util.find_spec("setuptools") is None:
        return False
    major, minor = (int(part) for part in importlib.metadata.version("setuptools").split(".")[:2])
    return (major, minor) >= (77, 0)


@pytest.fixture(scope="module")
def wheel_install(tmp_path_factory):
    """(the wheel, the directory it is installed into with `pip install --target`, what the
    build and the install printed)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        elif path.is_file():
            shutil.copy2(path, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    isolation = ["--no-build-isolation"] if _can_build_without_isolation() else []
    built = subprocess.run([*pip, "wheel", "--no-deps", *isolation, "-w", str(work / "dist"),
                            str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, f"pip wheel failed:\n{built.stdout}\n{built.stderr}"
    (wheel,) = (work / "dist").glob("nemo_tst-*.whl")
    target = work / "site"
    installed = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(target),
                                str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, f"pip install failed:\n{installed.stdout}\n{installed.stderr}"
    output = "\n".join((built.stdout, built.stderr, installed.stdout, installed.stderr))
    return wheel, target, output


def _run_installed(target: Path, args: list[str], cwd: Path, timeout: int = 300):
    """`python -m nemo_tst.cli ARGS` (or another command) in `cwd` with only the wheel's install
    on PYTHONPATH ahead of the venv, where nemo_tst is installed editable from this tree: the
    import finder of an editable install comes after PYTHONPATH, so the wheel's copy is used."""
    env = dict(os.environ, PYTHONPATH=str(target), PYTHONDONTWRITEBYTECODE="1")
    command = args if args[0] != "nemo-tst" else [sys.executable, "-m", "nemo_tst.cli", *args[1:]]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_wheel_carries_the_yaml(wheel_install):
    wheel, _, _ = wheel_install
    members = set(zipfile.ZipFile(wheel).namelist())
    assert "nemo_tst/conf/recipes/tst_tiny.yaml" in members
    assert "nemo_tst/conf/__init__.py" in members
    assert _packaged_yaml() <= members, f"left out of the wheel: {sorted(_packaged_yaml() - members)}"


def test_the_build_warns_of_nothing_in_our_configuration(wheel_install):
    """setuptools warns when it builds from a deprecated pyproject.toml (`project.license` as a
    table) or a package missing from `packages`; pip shows those warnings to every user."""
    _, _, output = wheel_install
    warnings = [line for line in output.splitlines() if "Warning" in line]
    assert not warnings, "\n".join(warnings)


def test_the_installed_wheel_lists_and_plans_recipes_from_elsewhere(wheel_install, tmp_path):
    _, target, _ = wheel_install
    where = _run_installed(target, [sys.executable, "-c",
                                    "import nemo_tst, nemo_tst.conf as c; print(nemo_tst.__file__); "
                                    "print(c.CONF_FILES); print(c.CONF_DIR)"], cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    for line in where.stdout.splitlines():
        assert Path(line).resolve().is_relative_to(target.resolve()), \
            f"{line} is not the wheel's install in {target}: PYTHONPATH did not win"
        assert not Path(line).resolve().is_relative_to(ROOT)

    listed = _run_installed(target, ["nemo-tst", "recipes"], cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    names = {line.split()[0] for line in listed.stdout.splitlines() if line.strip()}
    built_in = {path.stem for path in (ROOT / "conf" / "recipes").glob("*.yaml")}
    assert built_in and built_in <= names, listed.stdout
    assert "precision presets: bf16" in listed.stdout

    # The console script pip wrote into the target, where there is one (pip writes it to bin/).
    script = target / "bin" / "nemo-tst"
    command = [str(script)] if script.is_file() else ["nemo-tst"]
    plan = _run_installed(target, [*command, "plan", "tst_tiny"], cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert "phase 1 (superposition)" in plan.stdout and "tst_tiny" in plan.stdout, plan.stdout


def test_the_installed_wheel_runs_the_ci_demo_from_elsewhere(wheel_install, tmp_path):
    """Both runs on CPU (about 1-2 minutes); the rank processes inherit PYTHONPATH."""
    _, target, _ = wheel_install
    out = tmp_path / "demo"
    demo = _run_installed(target, ["nemo-tst", "demo", "--size", "ci", "--out", str(out)],
                          cwd=tmp_path, timeout=900)
    assert demo.returncode == 0, f"{demo.stdout[-4000:]}\n{demo.stderr[-4000:]}"
    assert "TST - baseline" in demo.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["runs"]) == {"baseline", "tst"}
