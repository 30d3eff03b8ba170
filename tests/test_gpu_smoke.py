"""benchmarks/gpu_smoke.sh on CPU: its dry run (the plan and the environment probe), the op and
broadcast steps at small sizes on gloo, a step that fails or hangs not stopping the others, and
the shared Python set-up's route without pip (benchmarks/python_env.sh)."""

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(REPO), BENCH_PYTHON=sys.executable, **extra)
    env.pop("OUT", None)
    return env


def _smoke_module():
    spec = importlib.util.spec_from_file_location("gpu_smoke", REPO / "benchmarks" / "gpu_smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_prints_the_plan_and_writes_the_probe(tmp_path):
    out = tmp_path / "smoke.json"
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_smoke.sh"), "--dry-run", "--out", str(out),
         "--work", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=300, env=_env(BENCH_GIT_COMMIT="abc1234"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    smoke = _smoke_module()
    for name, (limit, _) in smoke.STEPS.items():  # every step, with its time limit
        assert f"  {name:<18} limit {limit:>3} s" in text
    gpu = next(line for line in text.splitlines() if line.strip().startswith("[gpu]"))
    cpu = next(line for line in text.splitlines() if line.strip().startswith("[cpu]"))
    assert "nemo_tst.cli pretrain" in gpu and "--transformer-impl local" in gpu and "--bf16" in gpu
    assert "--tst-cpu" not in gpu and "--log-interval 1" in gpu
    assert "CUDA_VISIBLE_DEVICES= " in cpu and "--tst-cpu" in cpu and "--seed 1234" in cpu
    assert "[dry-run] nothing else was run" in text
    record = json.loads(out.read_text())
    assert record["dry_run"] is True and record["commit"] == "abc1234"
    probe = record["steps"]["probe"]
    assert probe["status"] == "pass", probe
    figures = probe["figures"]
    import torch

    assert record["torch"] == figures["torch"] == torch.__version__
    assert set(figures["tools"]) >= {"pip (this Python)", "pip (base Python)", "cc", "make", "nvcc", "nvidia-smi"}
    assert set(figures["imports"]) >= {"transformer_engine", "apex", "megatron.core", "triton"}
    assert figures["imports"]["megatron.core"] == {"ok": True, "version": "0.19.2"}
    assert figures["imports"]["nemo_tst"]["ok"] and figures["imports"]["megatron.training"]["ok"]
    assert set(record["steps_planned"]) == set(smoke.STEPS) - {"probe"}
    assert set(record["pretrain_commands"]) == {"gpu", "cpu"}


def test_op_and_broadcast_steps_on_cpu(tmp_path):
    out = tmp_path / "ops.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_smoke.py"), "--device", "cpu",
         "--only", "multi_hot_bf16,bag_mean_bf16,tp_broadcast", "--out", str(out),
         "--work", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=300, env=_env())
    record = json.loads(out.read_text())
    assert proc.returncode == 0, json.dumps(record, indent=1)[-4000:]
    steps = record["steps"]
    assert set(steps) == {"multi_hot_bf16", "bag_mean_bf16", "tp_broadcast"}
    multi = steps["multi_hot_bf16"]["figures"]
    assert multi["bf16"]["grad_dtype"] == "torch.bfloat16" and multi["bf16"]["loss_dtype"] == "torch.float32"
    assert 0 < multi["bf16"]["grad"]["norm_rel"] < 1e-2  # bf16 rounding seen, and small
    assert multi["fp32"]["loss"]["max_abs"] < 1e-4
    bag = steps["bag_mean_bf16"]["figures"]
    assert bag["out_dtype"] == "torch.bfloat16" and 0 < bag["out"]["max_rel_to_max"] < 1e-2
    tp = steps["tp_broadcast"]["figures"]
    assert tp["backend"] == "gloo" and tp["reported_tp_size"] == 2 and tp["world_size"] == 1
    for key in ("phase1__broadcast_over_tp", "phase1_get_batch", "phase2__broadcast_over_tp", "phase2_get_batch"):
        assert tp[key]["ok"] and tp[key]["broadcasts"] >= 2, tp[key]  # the TP = 2 path ran
        assert tp[key]["out_devices"] == ["cpu"]
    assert tp["phase1_get_batch"]["keys"] == ["loss_mask", "text"]
    assert tp["cpu_tensor_rejected"] is False  # gloo takes CPU tensors; NCCL is the GPU's check


def test_a_step_that_fails_or_hangs_is_recorded_and_the_others_run(tmp_path):
    smoke = _smoke_module()
    args = SimpleNamespace(work=str(tmp_path / "work"), out=str(tmp_path / "r.json"), dry_run=False,
                           device="cpu", budget=300, only=None)
    run = smoke.Smoke(args)

    def job(name, code, limit):
        log = open(run.work / f"step_{name}.log", "w")
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        import time

        return {"name": name, "proc": proc, "limit": limit, "t0": time.time(),
                "file": run.work / f"step_{name}.json", "log": log}

    run.finish(job("multi_hot_bf16", "import time; print('started'); time.sleep(60)", 2))
    run.finish(job("bag_mean_bf16", "import sys; print('boom'); sys.exit(3)", 30))
    record = json.loads(Path(args.out).read_text())
    hung, crashed = record["steps"]["multi_hot_bf16"], record["steps"]["bag_mean_bf16"]
    assert hung["status"] == "timeout" and hung["seconds"] < 20 and "started" in hung["output_tail"]
    assert crashed["status"] == "error" and "ended with 3" in crashed["error"]
    assert "boom" in crashed["output_tail"]


def _wheel(directory: Path) -> Path:
    """A minimal wheel: one module and its dist-info."""
    path = directory / "tinypkg-1.2.3-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr("tinypkg/__init__.py", "VALUE = 42\n")
        whl.writestr("tinypkg-1.2.3.dist-info/METADATA", "Metadata-Version: 2.1\nName: tinypkg\nVersion: 1.2.3\n")
        whl.writestr("tinypkg-1.2.3.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr("tinypkg-1.2.3.dist-info/RECORD", "")
    return path


def test_without_pip_the_wheels_are_unpacked_into_the_venv(tmp_path):
    """The device machine's case when its python3 has no pip: benchmarks/python_env.sh makes the
    venv and unpacks the wheel into it (run_all.sh --gpu-window and gpu_smoke.sh share it)."""
    base_env = tmp_path / "base"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(base_env)], check=True)
    base = base_env / "bin" / "python"
    assert subprocess.run([str(base), "-m", "pip", "--version"], capture_output=True).returncode != 0
    # A package the base sees only through a .pth file of its own site-packages (as an editable
    # install is seen) is seen by the made venv too.
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "extramod.py").write_text("NAME = 'extra'\n")
    base_site = subprocess.run([str(base), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip()
    Path(base_site, "extra.pth").write_text(str(tmp_path / "extra") + "\n")
    work = tmp_path / "checkout"
    (work / "benchmarks" / "wheels").mkdir(parents=True)
    _wheel(work / "benchmarks" / "wheels")
    script = (f". {REPO / 'benchmarks' / 'python_env.sh'}; bench_make_env || exit 1; "
              f'echo "PY=$PY"; echo "SETUP=$BENCH_SETUP"; '
              '"$PY" -c "import tinypkg, extramod, importlib.metadata as m; '
              'print(tinypkg.VALUE, m.version(\'tinypkg\'), extramod.NAME)"')
    env = dict(os.environ, BENCH_BASE_PYTHON=str(base))
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(["bash", "-c", script], cwd=work, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PY=benchmarks/.venv/bin/python" in proc.stdout
    assert "no pip: wheels unpacked" in proc.stdout
    assert "42 1.2.3 extra" in proc.stdout
    site_pth = list((work / "benchmarks" / ".venv").glob("lib/python*/site-packages/nemo_tst_checkout.pth"))
    assert site_pth and site_pth[0].read_text().strip() == str(work)
