"""The GPU smoke check: does nemo-tst work on this GPU machine, and how closely does it agree with
the CPU? About five minutes on one H200-class GPU, set-up included (`gpu_smoke.sh`).

    python benchmarks/gpu_smoke.py [--dry-run] [--device auto|cuda|cpu] [--only STEPS] [--out FILE]

Steps (each in its own process, under its own time limit; a step that fails, crashes or times
out is recorded and the others still run):

    probe              pip, cc, make, nvcc, nvidia-smi; torch, CUDA, cuDNN and NCCL versions;
                       Transformer Engine, Apex, megatron-core, triton imports (also in --dry-run)
    tst_tiny_pretrain  `nemo-tst pretrain` of the tst_tiny recipe across the phase handoff, with
                       the recipe's GPU arguments (cpu=false, transformer_impl=local), and the
                       same seed and initial weights with cpu=true on this machine's CPU (CUDA
                       hidden), side by side; per-iteration losses of both and their difference
    multi_hot_bf16     multi_hot_cross_entropy on the device in bf16 (and fp32) against a plain
                       fp32 PyTorch reference: loss and logit-gradient errors
    bag_mean_bf16      the bag-mean embedding lookup (bag_mean_vocab_parallel_lookup) in bf16
                       against an fp32 reference: output and weight-gradient errors
    tp_broadcast       the batch broadcast over tensor parallelism (nemo_tst.training.step) on a
                       one-process NCCL group that reports size 2, so the broadcast really runs,
                       for a phase-1 and a phase-2 batch; NCCL rejects CPU tensors

The pretraining runs in the background while the other steps run. Raw results (device name,
torch and CUDA versions, commit, every figure, pass/fail and error text) go to one JSON file:
--out, else $OUT/gpu_smoke.json when OUT is set, else benchmarks/results/gpu_smoke-<date>.json;
it is rewritten after every step, so a run cut short keeps what it measured. The trainer logs
go beside it as gpu_smoke_logs.tar.gz.

`--device cpu` runs the same steps on CPU with small sizes (gloo instead of NCCL; the pretraining
step's device run becomes a second CPU run): it checks the script, and measures nothing about a
GPU.
"""

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = "tst_tiny"
BUDGET_SECONDS = 300  # the whole check on a GPU, set-up included (gpu_smoke.sh starts the clock)

# name: (time limit in seconds, what it checks). The limits fit BUDGET_SECONDS: the pretraining
# runs beside the three op checks.
STEPS = {
    "probe": (60, "environment: pip, cc, make, nvcc, nvidia-smi, torch/CUDA/cuDNN/NCCL versions, "
                  "Transformer Engine, Apex, megatron-core and triton imports"),
    "tst_tiny_pretrain": (230, f"nemo-tst pretrain {RECIPE} across the phase handoff on the GPU "
                               "(recipe GPU arguments, transformer_impl=local) and on the CPU "
                               "(cpu=true, CUDA hidden), same seed; per-iteration losses compared"),
    "multi_hot_bf16": (60, "multi_hot_cross_entropy in bf16 on the device vs an fp32 reference"),
    "bag_mean_bf16": (60, "bag-mean embedding lookup in bf16 on the device vs an fp32 reference"),
    "tp_broadcast": (60, "the TP batch broadcast through a one-process NCCL group reporting size 2"),
}
BACKGROUND = "tst_tiny_pretrain"
# Pass criteria (recorded with the figures).
TOL = {
    "multi_hot_loss_abs": 1e-3,     # nats; bf16 input, fp32 arithmetic: only summation order differs
    "multi_hot_grad_rel": 1e-2,     # ||g - g_ref|| / ||g_ref||; the gradient is rounded to bf16
    "fp32_loss_abs": 1e-4,
    "fp32_grad_rel": 1e-4,
    "bag_mean_out_rel": 1e-2,       # max |out - ref| / max |ref|; one bf16 rounding of an fp32 mean
    "bag_mean_grad_rel": 1e-2,
    "pretrain_first_abs": 0.05,     # nats at iteration 1: same weights and batch, bf16 vs fp32
    "pretrain_loss_abs": 0.25,      # nats at any iteration: the runs drift apart as they train
}
TAIL = 3000  # characters of output kept with a failure


# ------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------

def _run(cmd, timeout=20, env=None) -> dict:
    """A command's exit status and output (trimmed), never raising."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        return {"rc": proc.returncode, "out": (proc.stdout + proc.stderr).strip()[-600:]}
    except FileNotFoundError:
        return {"rc": None, "out": "not found"}
    except subprocess.TimeoutExpired:
        return {"rc": None, "out": f"timed out after {timeout} s"}


def _first_line(result: dict) -> str:
    return result["out"].splitlines()[0] if result["out"] else ""


def _errors(a, b) -> dict:
    """max abs and relative errors of tensor `a` against the reference `b` (fp32 arithmetic)."""
    a, b = a.detach().float(), b.detach().float()
    diff = (a - b).abs()
    ref_max = b.abs().max().item()
    return {
        "max_abs": diff.max().item(),
        "max_rel_to_max": diff.max().item() / ref_max if ref_max else float("inf"),
        "norm_rel": ((a - b).norm() / b.norm()).item() if b.norm().item() else float("inf"),
        "max_elementwise_rel": (diff / b.abs().clamp_min(1e-6 * max(ref_max, 1e-30))).max().item(),
    }


def _git_commit() -> str:
    if os.environ.get("BENCH_GIT_COMMIT"):
        return os.environ["BENCH_GIT_COMMIT"]
    got = _run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    return got["out"] if got["rc"] == 0 else "unknown (no git here; set BENCH_GIT_COMMIT)"


# ------------------------------------------------------------------------------------------------
# The steps (each runs in a child process: `gpu_smoke.py --step NAME`)
# ------------------------------------------------------------------------------------------------

def step_probe(device: str, work: Path) -> dict:
    figures = {
        "python": sys.version.split()[0], "python_executable": sys.executable,
        "python_setup": os.environ.get("BENCH_SETUP", ""),
        "base_python": os.environ.get("BENCH_BASE_PYTHON", "python3"),
        "host": socket.gethostname(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "commit": _git_commit(),
    }
    base = shutil.which(figures["base_python"]) or figures["base_python"]
    tools = {
        "pip (this Python)": [sys.executable, "-m", "pip", "--version"],
        "pip (base Python)": [base, "-m", "pip", "--version"],
        "cc": ["cc", "--version"], "make": ["make", "--version"], "nvcc": ["nvcc", "--version"],
        "nvidia-smi": ["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                       "--format=csv,noheader"],
    }
    figures["tools"] = {}
    for name, cmd in tools.items():
        got = _run(cmd)
        lines = got["out"].splitlines() or [""]
        figures["tools"][name] = {"found": got["rc"] == 0,
                                  "version": lines[-1] if name == "nvcc" else lines[0]}
    import torch

    figures["torch"] = torch.__version__
    figures["torch_cuda"] = torch.version.cuda
    figures["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        figures["device_count"] = torch.cuda.device_count()
        figures["device_name"] = torch.cuda.get_device_name(0)
        figures["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        figures["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        figures["bf16_supported"] = torch.cuda.is_bf16_supported()
        with contextlib.suppress(Exception):
            nccl = torch.cuda.nccl.version()
            figures["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    with contextlib.suppress(Exception):
        figures["cudnn"] = torch.backends.cudnn.version()
    # Each import in a fresh interpreter, all at once: a failing or slow one spoils nothing else.
    procs = {}
    for module, dist in (("transformer_engine", "transformer-engine"), ("apex", "apex"),
                         ("megatron.core", "megatron-core"), ("megatron.training", None),
                         ("triton", "triton"), ("tokenizers", "tokenizers"), ("nemo_tst", None)):
        code = (f"import importlib, importlib.metadata as m; importlib.import_module({module!r}); "
                + (f"print(m.version({dist!r}))" if dist else "print('imported')"))
        procs[module] = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True)
    imports, deadline = {}, time.time() + 45
    for module, proc in procs.items():
        try:
            text, _ = proc.communicate(timeout=max(deadline - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            imports[module] = {"ok": False, "error": "import timed out"}
            continue
        text = text.strip()
        last = text.splitlines()[-1] if text else ""
        imports[module] = ({"ok": True, "version": last} if proc.returncode == 0
                           else {"ok": False, "error": last[-400:] or f"exit {proc.returncode}"})
    figures["imports"] = imports
    # What the trainer needs on a GPU without TE and Apex; recorded, not judged.
    return {"status": "pass", "figures": figures}


def _recipe_argv(*, cpu: bool, data: dict, run_dir: Path, cache: Path) -> list[str]:
    """`nemo-tst plan tst_tiny --args` with the run's overrides: the recipe's own arguments."""
    prefix = data["train_prefix"].removesuffix("_train")
    extra = ["--data-cache-path", str(cache)]
    if not cpu:
        # The CPU run initialises on the CPU; so does the GPU run, from the same seed, so both
        # start from the same weights and the loss difference is the device's and precision's.
        extra.append("--use-cpu-initialization")
    overrides = [
        f"data.prefix={json.dumps(prefix)}", f"data.tokenizer={json.dumps(data['tokenizer'])}",
        f"model.vocab_size={data['vocab_size']}", "data.num_workers=0",
        f"cpu={'true' if cpu else 'false'}", "transformer_impl=local", "training.log_interval=1",
        f"run_dir={json.dumps(str(run_dir))}", f"extra_args={json.dumps(extra)}",
    ]
    got = subprocess.run([sys.executable, "-m", "nemo_tst.cli", "plan", RECIPE, "--args", *overrides],
                         capture_output=True, text=True, timeout=120)
    if got.returncode != 0:
        raise RuntimeError(f"nemo-tst plan {RECIPE} --args failed: {got.stderr.strip()[-TAIL:]}")
    return got.stdout.split("\n")[:-1] if got.stdout.endswith("\n") else got.stdout.split("\n")


def pretrain_plan(work: Path) -> dict:
    """What the pretraining step runs: the data it prepares and the two commands."""
    data = {"tokenizer": str(work / "data" / "tokenizer.json"),
            "train_prefix": str(work / "data" / "stdlib_train"),
            "valid_prefix": str(work / "data" / "stdlib_valid"), "vocab_size": 1024}
    return {"data": data, "runs": {
        name: [sys.executable, "-m", "nemo_tst.cli", "pretrain",
               *_recipe_argv(cpu=name == "cpu", data=data, run_dir=work / f"run_{name}",
                             cache=work / f"index_cache_{name}")]
        for name in ("gpu", "cpu")}}


def step_tst_tiny_pretrain(device: str, work: Path, limit: float) -> dict:
    from nemo_tst.core.run_dir import RunDirectory
    from nemo_tst.demo import prepare_stdlib_data
    from nemo_tst.training.logs import parse_training_log

    start = time.time()
    figures = {}
    data = prepare_stdlib_data(work / "data", max_bytes=300_000, vocab_size=1024, workers=4)
    figures["data_seconds"] = round(time.time() - start, 1)
    figures["data"] = {k: data[k] for k in ("train_tokens", "valid_tokens", "vocab_size")}
    runs = {}
    for name in ("gpu", "cpu"):
        run_dir = work / f"run_{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        # --device cpu: the device run is a second CPU run (checks this step's plumbing only).
        argv = _recipe_argv(cpu=name == "cpu" or device == "cpu", data=data, run_dir=run_dir,
                            cache=work / f"index_cache_{name}")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if name == "cpu" or device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        cmd = [sys.executable, "-m", "nemo_tst.cli", "pretrain", *argv]
        log = open(work / f"pretrain_{name}.log", "w")
        runs[name] = {"cmd": cmd, "log": log, "t0": time.time(),
                      "proc": subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                               start_new_session=True)}
        figures[f"{name}_command"] = " ".join(cmd)
    deadline = start + limit - 10
    for name, run in runs.items():
        proc = run["proc"]
        try:
            proc.wait(timeout=max(deadline - time.time(), 1))
            run["rc"] = proc.returncode
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            run["rc"] = "timed out"
        run["log"].close()
        run["seconds"] = round(time.time() - run["t0"], 1)
    status, errors = "pass", []
    losses = {}
    for name, run in runs.items():
        run_directory = RunDirectory(work / f"run_{name}")
        train_log = run_directory.log
        text = train_log.read_text(errors="replace") if train_log.is_file() else ""
        terminal = (work / f"pretrain_{name}.log").read_text(errors="replace")
        parsed = parse_training_log(text)
        losses[name] = {it: _loss(values) for it, values in sorted(parsed.train.items())}
        figures[name] = {
            "rc": run["rc"], "seconds": run["seconds"],
            "iterations_logged": len(parsed.train), "phase_of_iteration": dict(sorted(parsed.phase.items())),
            "losses": losses[name], "valid": dict(sorted(parsed.valid.items())),
            # Phase 2 resumes phase 1's last checkpoint: the handoff.
            "handoff_loaded_at_iteration": next(
                (int(m.group(1)) for m in re.finditer(
                    r"successfully loaded checkpoint from " + re.escape(str(run_directory.phase_dir(1)))
                    + r"\S* .*?at iteration (\d+)", text)), None),
        }
        if run["rc"] != 0:
            status = "fail"
            figures[name]["output_tail"] = (terminal + "\n" + text[-TAIL:])[-TAIL:]
            errors.append(f"{name} run: exit {run['rc']}")
    common = sorted(set(losses.get("gpu", {})) & set(losses.get("cpu", {})))
    if common:
        diffs = {it: abs(losses["gpu"][it] - losses["cpu"][it]) for it in common}
        figures["compared_iterations"] = len(common)
        figures["loss_abs_diff"] = diffs
        figures["max_loss_abs_diff"] = max(diffs.values())
        figures["first_iteration_abs_diff"] = diffs[common[0]]
        figures["tolerances"] = {k: v for k, v in TOL.items() if k.startswith("pretrain")}
        if figures["first_iteration_abs_diff"] > TOL["pretrain_first_abs"]:
            status = "fail"
            errors.append(f"GPU and CPU losses differ by {figures['first_iteration_abs_diff']:.4f} nats at "
                          f"iteration {common[0]} (tolerance {TOL['pretrain_first_abs']})")
        if figures["max_loss_abs_diff"] > TOL["pretrain_loss_abs"]:
            status = "fail"
            errors.append(f"GPU and CPU losses differ by up to {figures['max_loss_abs_diff']:.4f} nats "
                          f"(tolerance {TOL['pretrain_loss_abs']})")
    elif status == "pass":
        status = "fail"
        errors.append("no iteration logged by both runs")
    phases = set(figures.get("gpu", {}).get("phase_of_iteration", {}).values())
    if status == "pass" and phases != {1, 2}:
        status = "fail"
        errors.append(f"the GPU run logged phases {sorted(phases)}, not both")
    return {"status": status, "figures": figures, "error": "; ".join(errors) or None}


def _loss(values: dict) -> float:
    from nemo_tst.training.logs import training_loss

    return training_loss(values)


def _kill_group(proc) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _one_rank_world(device: str) -> None:
    """A world of one process: NCCL on a GPU, gloo on CPU; Megatron's groups on top (TP = 1)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    store = dist.HashStore() if hasattr(dist, "HashStore") else None
    if device == "cuda":
        torch.cuda.set_device(0)
        kwargs = {"device_id": torch.device("cuda", 0)}
    else:
        from nemo_tst import cpu

        cpu.enable_megatron_cpu()
        kwargs = {}
    backend = "nccl" if device == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, store=store, rank=0, world_size=1, **kwargs)
    except TypeError:  # a torch without init_process_group(device_id=...)
        dist.init_process_group(backend, store=store, rank=0, world_size=1)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    if device == "cuda":
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(1234)


def step_multi_hot_bf16(device: str, work: Path) -> dict:
    import torch

    from nemo_tst.superposition.loss import multi_hot_cross_entropy

    L, b, V, s = (512, 4, 32768, 4) if device == "cuda" else (32, 2, 1024, 4)
    gen = torch.Generator(device="cpu").manual_seed(0)
    z32 = (torch.randn(L, b, V, generator=gen) * 3).to(device)
    y = torch.randint(0, V, (L, b, s), generator=gen).to(device)
    y[..., 1] = y[..., 0]  # a repeated id in every bag
    w = torch.rand(L, b, s, generator=gen).to(device)  # upstream gradient of each CE

    def reference(z):  # plain fp32 PyTorch: CE_j = logsumexp(z) - z[y_j]
        zr = z.detach().float().requires_grad_()
        ce = torch.logsumexp(zr, dim=-1, keepdim=True) - torch.gather(zr, -1, y)
        (ce * w).sum().backward()
        return ce.detach(), zr.grad

    def ours(z):
        zo = z.detach().clone().requires_grad_()
        ce = multi_hot_cross_entropy(zo, y)
        (ce * w).sum().backward()
        return ce.detach(), zo.grad

    figures = {"shape": {"L": L, "b": b, "V": V, "s": s}, "device": device}
    zb = z32.bfloat16()
    ce_b, g_b = ours(zb)
    ce_r, g_r = reference(zb)  # the reference sees the same bf16-rounded logits, in fp32
    figures["bf16"] = {"loss": _errors(ce_b, ce_r), "grad": _errors(g_b, g_r),
                       "loss_dtype": str(ce_b.dtype), "grad_dtype": str(g_b.dtype)}
    ce_f, g_f = ours(z32)
    ce_r32, g_r32 = reference(z32)
    figures["fp32"] = {"loss": _errors(ce_f, ce_r32), "grad": _errors(g_f, g_r32)}
    figures["tolerances"] = {k: v for k, v in TOL.items() if k.startswith(("multi_hot", "fp32"))}
    bad = []
    if figures["bf16"]["loss"]["max_abs"] > TOL["multi_hot_loss_abs"]:
        bad.append(f"bf16 loss max abs error {figures['bf16']['loss']['max_abs']:.3g}")
    if figures["bf16"]["grad"]["norm_rel"] > TOL["multi_hot_grad_rel"]:
        bad.append(f"bf16 gradient relative error {figures['bf16']['grad']['norm_rel']:.3g}")
    if figures["fp32"]["loss"]["max_abs"] > TOL["fp32_loss_abs"]:
        bad.append(f"fp32 loss max abs error {figures['fp32']['loss']['max_abs']:.3g}")
    if figures["fp32"]["grad"]["norm_rel"] > TOL["fp32_grad_rel"]:
        bad.append(f"fp32 gradient relative error {figures['fp32']['grad']['norm_rel']:.3g}")
    return {"status": "fail" if bad else "pass", "figures": figures, "error": "; ".join(bad) or None}


def step_bag_mean_bf16(device: str, work: Path) -> dict:
    import torch
    from megatron.core import tensor_parallel
    from megatron.core.model_parallel_config import ModelParallelConfig

    from nemo_tst.superposition.embedding import bag_mean_vocab_parallel_lookup

    _one_rank_world(device)
    b, L, s, V, h = (4, 512, 4, 32768, 1024) if device == "cuda" else (2, 16, 4, 512, 64)
    torch.manual_seed(0)
    config = ModelParallelConfig(params_dtype=torch.bfloat16, use_cpu_initialization=True)
    table = tensor_parallel.VocabParallelEmbedding(
        V, h, init_method=torch.nn.init.normal_, config=config).to(device)
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, V, (b, L * s), generator=gen).to(device)
    ids[:, 1::s] = ids[:, 0::s]  # a repeated id in every bag
    upstream = torch.randn(b, L, h, generator=gen).to(device)

    out = bag_mean_vocab_parallel_lookup(table, ids, s)  # [b, L, h] bf16
    (out.float() * upstream).sum().backward()
    weight_ref = table.weight.detach().float().requires_grad_()
    ref = weight_ref[ids].view(b, L, s, h).mean(dim=2)  # fp32 reference of the same bf16 table
    (ref * upstream).sum().backward()
    figures = {"shape": {"b": b, "L": L, "s": s, "V": V, "h": h}, "device": device,
               "out_dtype": str(out.dtype), "grad_dtype": str(table.weight.grad.dtype),
               "out": _errors(out, ref), "grad": _errors(table.weight.grad, weight_ref.grad),
               "tolerances": {k: v for k, v in TOL.items() if k.startswith("bag_mean")}}
    bad = []
    if figures["out"]["max_rel_to_max"] > TOL["bag_mean_out_rel"]:
        bad.append(f"output error {figures['out']['max_rel_to_max']:.3g} of its largest value")
    if figures["grad"]["norm_rel"] > TOL["bag_mean_grad_rel"]:
        bad.append(f"weight-gradient relative error {figures['grad']['norm_rel']:.3g}")
    return {"status": "fail" if bad else "pass", "figures": figures, "error": "; ".join(bad) or None}


class ReportsSize:
    """A process group that reports another size: Megatron's TP group of a one-process world,
    made to look like TP = 2 so that code taking the TP > 1 path really calls the collectives
    (a broadcast from rank 0 in a group of one is the identity). Everything else, the hash and
    equality that torch.distributed's group tables use included, is the real group's."""

    def __init__(self, group, size: int):
        self._group, self._size = group, size

    def size(self) -> int:
        return self._size

    def __getattr__(self, name):
        return getattr(self._group, name)

    def __hash__(self):
        return hash(self._group)

    def __eq__(self, other):
        return other is self or other is self._group or (
            isinstance(other, ReportsSize) and other._group is self._group)


def step_tp_broadcast(device: str, work: Path) -> dict:
    """The batch broadcast through Megatron's TP group reporting size 2 on a world of one: what
    the broadcast hands NCCL (count and devices of the tensors) and what comes back. Called
    through `_broadcast_over_tp` and `get_batch` with the arguments their signatures ask for (a
    target device, a model whose parameters say where the batch goes)."""
    import inspect

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from nemo_tst.training import step as tst_step

    _one_rank_world(device)
    real = parallel_state.get_tensor_model_parallel_group()
    fake = ReportsSize(real, 2)
    target = torch.device(device, 0) if device == "cuda" else torch.device("cpu")
    figures = {"backend": dist.get_backend(), "device": device, "reported_tp_size": fake.size(),
               "world_size": dist.get_world_size(),
               "signatures": {name: str(inspect.signature(getattr(tst_step, name)))
                              for name in ("_broadcast_over_tp", "get_batch")}}

    class OnDevice(torch.nn.Module):  # a model chunk as get_batch sees one: parameters, vp_stage
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1, device=target))
            self.vp_stage = None

    def call(fn, batch, data_iterator=None):
        params = inspect.signature(fn).parameters
        if fn is tst_step.get_batch:
            kwargs = {"model": OnDevice()} if "model" in params else {}
            return fn(data_iterator, **kwargs)
        kwargs = {"device": target} if "device" in params else {}
        return fn(batch, **kwargs)

    seen = []  # (device, dtype, shape) of every tensor broadcast
    real_broadcast = torch.distributed.broadcast

    def spy(tensor, *args, **kwargs):
        seen.append((str(tensor.device), str(tensor.dtype).replace("torch.", ""), tuple(tensor.shape)))
        return real_broadcast(tensor, *args, **kwargs)

    gen = torch.Generator().manual_seed(0)
    s, L, b = 4, 16, 2
    batches = {
        "phase1": {"text": torch.randint(0, 1000, (b, s * L + s), generator=gen),
                   "loss_mask": torch.ones(b, s * L)},
        "phase2": {"tokens": torch.randint(0, 1000, (b, L), generator=gen),
                   "labels": torch.randint(0, 1000, (b, L), generator=gen),
                   "position_ids": torch.arange(L).repeat(b, 1), "loss_mask": torch.ones(b, L)},
    }
    bad = []
    original = parallel_state.get_tensor_model_parallel_group
    parallel_state.get_tensor_model_parallel_group = lambda *a, **k: fake
    torch.distributed.broadcast = spy
    try:
        for phase, batch in batches.items():
            for how in ("_broadcast_over_tp", "get_batch"):
                key = f"{phase}_{how}"
                seen.clear()
                try:
                    if how == "get_batch":  # from the data loader's CPU tensors
                        out = call(tst_step.get_batch, None, iter([dict(batch)]))
                    else:  # a batch already on the device
                        out = call(tst_step._broadcast_over_tp, {k: v.to(target) for k, v in batch.items()})
                    if device == "cuda":
                        torch.cuda.synchronize()
                    same = set(out) == set(batch) and all(
                        torch.equal(out[k].cpu().to(batch[k].dtype), batch[k]) for k in batch)
                    devices = sorted({str(v.device) for v in out.values()})
                    figures[key] = {"ok": same and bool(seen) and devices == [str(target)],
                                    "broadcasts": len(seen), "broadcast_tensors": list(seen),
                                    "out_devices": devices, "keys": sorted(out)}
                    if not seen:
                        bad.append(f"{key}: no broadcast ran (the group's reported size was not used)")
                    if not same:
                        bad.append(f"{key}: the broadcast batch differs from the input")
                    if devices != [str(target)]:
                        bad.append(f"{key}: the batch came back on {devices}, not {target}")
                except Exception as err:  # recorded: this is what the step is for
                    figures[key] = {"ok": False, "broadcast_tensors": list(seen),
                                    "error": f"{type(err).__name__}: {err}"[:800]}
                    bad.append(f"{key}: {type(err).__name__}: {str(err)[:200]}")
    finally:
        parallel_state.get_tensor_model_parallel_group = original
        torch.distributed.broadcast = real_broadcast
    # The control: does this group reject a CPU tensor? (NCCL does; gloo does not.)
    try:
        dist.broadcast(torch.zeros(1, dtype=torch.int64), 0, group=real)
        figures["cpu_tensor_rejected"] = False
    except Exception as err:
        figures["cpu_tensor_rejected"] = True
        figures["cpu_tensor_error"] = f"{type(err).__name__}: {err}"[:300]
    if device == "cuda" and not figures["cpu_tensor_rejected"]:
        bad.append("the NCCL group accepted a CPU tensor: the step proves nothing about devices")
    return {"status": "fail" if bad else "pass", "figures": figures, "error": "; ".join(bad) or None}


STEP_FUNCS = {"probe": step_probe, "tst_tiny_pretrain": step_tst_tiny_pretrain,
              "multi_hot_bf16": step_multi_hot_bf16, "bag_mean_bf16": step_bag_mean_bf16,
              "tp_broadcast": step_tp_broadcast}


def run_step_here(name: str, device: str, work: Path, limit: float, out: Path) -> int:
    """Child side: run one step, write {status, figures, error} to `out`."""
    try:
        fn = STEP_FUNCS[name]
        result = fn(device, work, limit) if name == BACKGROUND else fn(device, work)
    except Exception as err:
        result = {"status": "error", "error": f"{type(err).__name__}: {err}",
                  "traceback": traceback.format_exc()[-TAIL:]}
    out.write_text(json.dumps(result, indent=1, default=str))
    sys.stdout.flush()
    os._exit(0)  # no teardown of NCCL or Megatron state: the result is written


# ------------------------------------------------------------------------------------------------
# The orchestration
# ------------------------------------------------------------------------------------------------

class Smoke:
    def __init__(self, args):
        self.args = args
        self.t0 = float(os.environ.get("GPU_SMOKE_START", time.time()))
        self.work = Path(args.work).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.out = Path(args.out).resolve()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.record = {
            "what": "nemo-tst GPU smoke check", "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "dry_run": args.dry_run,
            "device": args.device, "budget_seconds": args.budget, "steps": {},
        }

    def elapsed(self) -> float:
        return time.time() - self.t0

    def save(self) -> None:
        self.record["elapsed_seconds"] = round(self.elapsed(), 1)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.record, indent=1, default=str))
        os.replace(tmp, self.out)

    def limit(self, name: str) -> float:
        cap = STEPS[name][0]
        return max(min(cap, self.args.budget - self.elapsed() - 5), 1)

    def start(self, name: str):
        limit = self.limit(name)
        result_file = self.work / f"step_{name}.json"
        result_file.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--device", self.args.device,
               "--work", str(self.work), "--step-limit", str(limit), "--step-out", str(result_file)]
        log = open(self.work / f"step_{name}.log", "w")
        print(f"[gpu_smoke] {name}: start at {self.elapsed():.0f} s, limit {limit:.0f} s", flush=True)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        return {"name": name, "proc": proc, "limit": limit, "t0": time.time(), "file": result_file, "log": log}

    def finish(self, job) -> None:
        name, proc = job["name"], job["proc"]
        timed_out = False
        try:
            proc.wait(timeout=max(job["limit"] - (time.time() - job["t0"]), 0.1))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
        job["log"].close()
        seconds = round(time.time() - job["t0"], 1)
        output = (self.work / f"step_{name}.log").read_text(errors="replace")
        if job["file"].is_file():
            result = json.loads(job["file"].read_text())
        elif timed_out:
            result = {"status": "timeout", "error": f"no result within its limit of {job['limit']:.0f} s",
                      "output_tail": output[-TAIL:]}
        else:
            result = {"status": "error", "error": f"the step's process ended with {proc.returncode} "
                      "without a result", "output_tail": output[-TAIL:]}
        if result.get("status") == "error" and "output_tail" not in result:
            result["output_tail"] = output[-TAIL:]
        result.update(seconds=seconds, limit_seconds=round(job["limit"]), what=STEPS[name][1])
        self.record["steps"][name] = result
        line = f"[gpu_smoke] {name}: {result['status']} after {seconds} s"
        if result.get("error"):
            line += f": {str(result['error']).splitlines()[0][:300]}"
        print(line, flush=True)
        self.save()

    def run(self) -> int:
        selected = [s for s in STEPS if self.args.only is None or s in self.args.only]
        print(f"[gpu_smoke] device {self.args.device}; results -> {self.out}; work -> {self.work}", flush=True)
        self.print_plan(selected)
        self.save()
        if "probe" in selected:
            self.finish(self.start("probe"))
            probe = self.record["steps"]["probe"].get("figures", {})
            for key in ("device_name", "torch", "torch_cuda", "commit"):
                self.record[key] = probe.get(key)
            self.save()
        if self.args.dry_run:
            self.record["steps_planned"] = {s: {"limit_seconds": STEPS[s][0], "what": STEPS[s][1]}
                                            for s in selected if s != "probe"}
            self.save()
            print(f"[dry-run] nothing else was run; results: {self.out}", flush=True)
            return 0
        background = self.start(BACKGROUND) if BACKGROUND in selected else None
        for name in selected:
            if name in ("probe", BACKGROUND):
                continue
            self.finish(self.start(name))
        if background is not None:
            self.finish(background)
        self.archive_logs()
        statuses = {n: r["status"] for n, r in self.record["steps"].items()}
        self.record["summary"] = statuses
        self.save()
        print(f"[gpu_smoke] done in {self.elapsed():.0f} s: "
              + ", ".join(f"{n} {s}" for n, s in statuses.items()), flush=True)
        print(f"[gpu_smoke] results: {self.out}", flush=True)
        return 0 if all(s == "pass" for s in statuses.values()) else 1

    def print_plan(self, selected) -> None:
        print(f"[gpu_smoke] plan ({self.args.budget} s in all; {BACKGROUND} runs beside the op checks):", flush=True)
        for name in selected:
            print(f"  {name:<18} limit {STEPS[name][0]:>3} s  {STEPS[name][1]}", flush=True)
        if BACKGROUND in selected:
            try:
                plan = pretrain_plan(self.work)
                self.record["pretrain_commands"] = {k: " ".join(v) for k, v in plan["runs"].items()}
                print(f"  {BACKGROUND} prepares the tst_tiny data in {self.work / 'data'}, then runs:", flush=True)
                for name, cmd in plan["runs"].items():
                    env = "CUDA_VISIBLE_DEVICES= " if name == "cpu" else ""
                    print(f"    [{name}] {env}{' '.join(cmd)}", flush=True)
            except Exception as err:  # the plan itself failing is a finding
                self.record["pretrain_commands"] = {"error": f"{type(err).__name__}: {err}"}
                print(f"    (the pretraining commands could not be made: {type(err).__name__}: {err})", flush=True)

    def archive_logs(self) -> None:
        tar_path = self.out.with_name("gpu_smoke_logs.tar.gz")
        with contextlib.suppress(Exception):
            with tarfile.open(tar_path, "w:gz") as tar:
                from nemo_tst.core.run_dir import RunDirectory

                run_logs = [RunDirectory(d).log for d in sorted(self.work.glob("run_*"))]
                for path in sorted(self.work.glob("*.log")) + [p for p in run_logs if p.is_file()]:
                    tar.add(path, arcname=str(path.relative_to(self.work)))
            self.record["logs"] = str(tar_path)


def default_out() -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_smoke.json"
    return REPO / "benchmarks" / "results" / f"gpu_smoke-{time.strftime('%Y%m%d-%H%M%S')}.json"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (steps, commands, time limits), run the environment probe, "
                             "write the JSON; run nothing else")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="auto: cuda when torch sees a GPU, else cpu (small sizes, gloo)")
    parser.add_argument("--only", type=lambda t: [x.strip() for x in t.split(",") if x.strip()], default=None,
                        help=f"comma-separated steps, from: {', '.join(STEPS)}")
    parser.add_argument("--out", default=None, help="the JSON file (default: $OUT/gpu_smoke.json, else "
                                                    "benchmarks/results/gpu_smoke-<date>.json)")
    parser.add_argument("--work", default=os.environ.get("BENCH_WORK", str(REPO / "benchmarks" / "work")) + "/gpu_smoke",
                        help="data, run directories and logs (default: benchmarks/work/gpu_smoke)")
    parser.add_argument("--budget", type=float, default=BUDGET_SECONDS,
                        help=f"seconds for everything, counted from $GPU_SMOKE_START (default {BUDGET_SECONDS})")
    parser.add_argument("--step", choices=list(STEPS), help=argparse.SUPPRESS)
    parser.add_argument("--step-out", help=argparse.SUPPRESS)
    parser.add_argument("--step-limit", type=float, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.only is not None:
        unknown = [s for s in args.only if s not in STEPS]
        if unknown:
            parser.error(f"--only: unknown step {', '.join(unknown)}; choose from {', '.join(STEPS)}")
    if args.device == "auto":
        try:
            import torch

            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        except Exception:
            args.device = "cpu"
    if args.step:
        return run_step_here(args.step, args.device, Path(args.work), args.step_limit, Path(args.step_out))
    args.out = args.out or str(default_out())
    return Smoke(args).run()


if __name__ == "__main__":
    sys.exit(main())
