"""What the four benchmarks share: device set-up, timing, the environment record, tables, JSON.

Timing: on CUDA each measured call is bracketed by CUDA events (GPU time of everything issued
between them, no host sync inside the loop); on CPU by `time.perf_counter`. Every number is
the median over many calls after warm-up calls that are not measured.
"""

import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # nemo_tst from this checkout, installed or not
    sys.path.insert(0, str(REPO))

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|transformer-engine|absl|experimental|deprecated|DEPRECATED).*")

import torch  # noqa: E402


def add_device_args(parser, *, default_out: str) -> None:
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="auto: cuda when available, else cpu")
    parser.add_argument("--out", type=Path, default=Path(default_out),
                        help="JSON file the results are written to")
    parser.add_argument("--seed", type=int, default=1234)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible; use --device cpu")
    if name == "cuda":
        torch.cuda.set_device(0)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return torch.device(name)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_megatron_single_process(device: torch.device, seed: int) -> None:
    """World size 1 (nccl on CUDA, gloo on CPU), TP = PP = 1, Megatron's RNG tracker seeded."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if device.type == "cpu":
        from nemo_tst import cpu

        cpu.enable_megatron_cpu(trainer=False)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    if device.type == "cpu":
        from nemo_tst import cpu

        cpu.seed_model_parallel(seed)
    else:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)


def time_calls(fn, device: torch.device, *, warmup: int, iters: int, before=None) -> list[float]:
    """Milliseconds of each of `iters` calls of fn() after `warmup` unmeasured calls.
    `before()` runs ahead of each call, outside the measured interval."""
    for _ in range(warmup):
        if before:
            before()
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        pairs = []
        for _ in range(iters):
            if before:
                before()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in pairs]
    times = []
    for _ in range(iters):
        if before:
            before()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def git_commit() -> str:
    if os.environ.get("BENCH_GIT_COMMIT"):
        return os.environ["BENCH_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "unknown (set BENCH_GIT_COMMIT)"


def environment(device: torch.device) -> dict:
    try:
        from importlib.metadata import version

        mcore = version("megatron-core")
    except Exception:  # noqa: BLE001 - a record, not a check
        mcore = "not installed"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(0)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return {
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "megatron_core": mcore,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "host": platform.node(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def fmt(value, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return format(value, spec)


def markdown_table(columns: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def print_table(title: str, columns: list[str], rows: list[list]) -> str:
    """Print a fixed-width table; return the same table as markdown."""
    cells = [columns] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    print(f"\n{title}")
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    return markdown_table(columns, rows)


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"\nwrote {path}")


# ----- one model shape, built two ways ---------------------------------------------------------


def add_shape_args(parser, gpu: dict, cpu: dict) -> None:
    """--layers --hidden --heads --ffn --vocab --seq --batch, defaulting per device."""
    for key in ("layers", "hidden", "heads", "ffn", "vocab", "seq", "batch"):
        parser.add_argument(f"--{key}", type=int, default=None,
                            help=f"default {gpu[key]} on CUDA, {cpu[key]} on CPU")


def fill_defaults(opts, device: torch.device, gpu: dict, cpu: dict) -> None:
    for key, value in (gpu if device.type == "cuda" else cpu).items():
        if getattr(opts, key, None) is None:
            setattr(opts, key, value)


def sdpa_spec_available() -> bool:
    try:
        from nemo_tst.attention import get_gpt_layer_sdpa_spec  # noqa: F401
    except ImportError:
        return False
    return True


def megatron_layer_spec(attention: str):
    """'unfused': megatron-core's local spec (its softmax attention path, what the trainer
    builds with --transformer-impl local); 'sdpa': nemo_tst.attention's spec, when present."""
    if attention == "unfused":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        return get_gpt_layer_local_spec(normalization="RMSNorm")
    if attention == "sdpa":
        from nemo_tst.attention import get_gpt_layer_sdpa_spec

        try:
            return get_gpt_layer_sdpa_spec(normalization="RMSNorm")
        except TypeError:
            return get_gpt_layer_sdpa_spec()
    raise ValueError(f"unknown attention {attention!r}")


def build_megatron_gpt(opts, device: torch.device, precision: str, attention: str = "unfused"):
    """A TSTGPTModel (= megatron-core GPTModel + the phase switch), Llama-style: RMSNorm,
    SwiGLU, RoPE, no biases, untied head. precision 'bf16': bf16 parameters (the trainer's
    compute dtype under --bf16); 'autocast' and 'fp32': fp32 parameters."""
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    from nemo_tst.superposition import TSTGPTModel

    bf16 = precision == "bf16"
    config = TransformerConfig(
        num_layers=opts.layers, hidden_size=opts.hidden, ffn_hidden_size=opts.ffn,
        num_attention_heads=opts.heads, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_cpu_initialization=device.type == "cpu", bias_dropout_fusion=False,
        apply_rope_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )
    model = TSTGPTModel(
        config=config, transformer_layer_spec=megatron_layer_spec(attention),
        vocab_size=opts.vocab, max_sequence_length=opts.seq, position_embedding_type="rope",
        share_embeddings_and_output_weights=False, parallel_output=True,
    )
    return model.to(device).train()


def autocast_context(precision: str, device: torch.device):
    import contextlib

    if precision == "autocast":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(model, device: torch.device, lr: float = 1e-5):
    """torch AdamW; the fused kernel on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1, **kwargs)


def matmul_flops_per_token(opts) -> float:
    """Parameters that multiply each token (the input embedding is a lookup, not counted):
    attention q,k,v,o 4*d*d, SwiGLU 3*d*ffn per layer, and the untied head d*V."""
    d = opts.hidden
    return opts.layers * (4 * d * d + 3 * d * opts.ffn) + d * opts.vocab


def train_flops_per_step(opts) -> float:
    """6*N per token for forward + backward of the matmuls, plus causal attention: per layer
    and token QK^T and AV cost 2*L*d each over the full L x L matrix, half of it under the
    causal mask, times 3 for forward + backward: 6*layers*L*d. Times b*L tokens."""
    tokens = opts.batch * opts.seq
    return 6 * matmul_flops_per_token(opts) * tokens + 6 * opts.layers * opts.seq * opts.hidden * tokens
