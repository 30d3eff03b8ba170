"""Megatron-Core and megatron.training on CPU with gloo: every patch in one place, all opt-in.

For tests, CI and the CPU demo only. Nothing else in `nemo_tst` imports this module, and it
changes nothing until `enable_megatron_cpu()` is called. Written against megatron-core 0.19;
every Megatron name it patches or relies on is listed in `MEGATRON_NAMES`, and
tests/test_cpu_support.py checks that each still exists in the installed megatron-core.

USAGE, MODEL LEVEL (build a GPTModel and run forward/backward on CPU; TP/PP/EP over gloo)::

    from nemo_tst import cpu
    cpu.enable_megatron_cpu(trainer=False)    # 1. first: before building anything
    torch.distributed.init_process_group("gloo", rank=r, world_size=w)  # MASTER_ADDR/PORT set
    parallel_state.initialize_model_parallel(tp, pp, expert_model_parallel_size=ep)
    cpu.seed_model_parallel(seed)             # 2. = torch.manual_seed + model_parallel_cuda_manual_seed
    model = GPTModel(config=TransformerConfig(..., use_cpu_initialization=True),
                     transformer_layer_spec=get_gpt_layer_local_spec(num_experts=...),
                     vocab_size=V, max_sequence_length=S, position_embedding_type="rope")
    loss = model(ids, position_ids, cpu.causal_attention_mask(s), labels=labels)  # [b, s] fp32
    loss.mean().backward()
    parallel_state.destroy_model_parallel(); torch.distributed.destroy_process_group()

- `use_cpu_initialization=True` makes the initial weights independent of the TP size (each rank
  draws the full matrix from the CPU generator and keeps its shard): TP=2 reproduces TP=1.
- An explicit mask is optional: without one Megatron's default causal mask is built on CPU.
- MoE: `moe_token_dispatcher_type="allgather"` (EP over gloo works). Not on CPU: "alltoall"
  (gloo's all_to_all_single rejects its split sizes), MoE with TP>1 in training mode (Megatron
  requires sequence parallel, which the local spec does not support), expert biases with TP=1
  (Megatron's MLP adds the bias in place to a custom Function's output; upstream, not CPU):
  use `add_bias_linear=False` for MoE.
- PP>1: pass `pipeline_dtype` in the config and run Megatron's schedule
  (`get_forward_backward_func()`), as on GPU; p2p over gloo works.
- HybridModel: give it a spec of local layers (Megatron's own hybrid specs are TE layers); its
  final norm, which HybridStack builds with TE's `TENorm` whatever the spec, is torch's norm.

USAGE, TRAINER LEVEL (`megatron.training.pretrain`)::

    from nemo_tst import cpu
    cpu.enable_megatron_cpu()                 # before parse_and_validate_args / pretrain
    args = parse_and_validate_args(); pretrain(pretrain_cfg_container_from_args(args), ...)

with `TRAINER_CPU_ARGS` (`--distributed-backend gloo --use-cpu-initialization ...`), the
plain-PyTorch layers' `nemo_tst.recipes.config.LOCAL_LAYERS_ARGS`, `--num-workers 0`, and
CUDA_DEVICE_MAX_CONNECTIONS=1 in the environment when TP or CP > 1 (validate_args asserts it
for pre-Blackwell devices, which CPU counts as). In forward_step move batches with
`.to(device)` where device is "cpu" when CUDA is unavailable: `.cuda()` there still fails.
Checked: world size 1; TP=2; PP=2 (also interleaved); DP=2 with and without
--use-distributed-optimizer (+ overlap grad-reduce / param-gather, --ckpt-fully-parallel-load);
MoE EP=2 (allgather); --bf16. Each saves torch_dist checkpoints and resumes from them with the
same losses as an uninterrupted run.

HOW IT PATCHES. Every patch is one entry of `_PATCHES`: a Megatron attribute, named
"module:qualified.name", and what replaces it; a comment at each entry says why. The replaced
object keeps the original as `__wrapped__`; `disable_megatron_cpu()` restores everything;
calling enable twice is a no-op; with CUDA available it refuses unless `force=True`. Three kinds:

1. The CPU view of torch (`module:torch`). In those modules only, the global name `torch` is
   rebound to a module object that forwards everything to torch except:
   `torch.cuda.current_device()` -> torch.device("cpu"); `synchronize`, `empty_cache`,
   `set_device` -> no-ops; `Stream`, `Event`, `current_stream`, `stream(...)` -> no-op
   stand-ins; memory statistics -> 0; `torch.cuda.{get,set}_rng_state`, `manual_seed` -> the
   CPU generator; factory functions (`torch.empty/zeros/ones/full/tensor/arange/rand...`) and
   `torch.device(...)` map a CUDA device to CPU. `torch.cuda.is_available()` stays False.
   torch itself is untouched.
2. CPU tensors passing as CUDA tensors. Tensor methods (`t.cuda()`, `t.type() ==
   "torch.cuda.FloatTensor"`) cannot be reached through a module's `torch`: a few Megatron
   functions run with `Tensor.cuda` = identity and `Tensor.type()` naming a CPU tensor by its
   CUDA type, for the duration of the call only.
3. Replaced functions and methods: the CUDA RNG tracker's states on the CPU generator,
   `initialize_megatron` without its CUDA assertion, no JIT warm-up (its tensors are made on
   "cuda"), no GPU architecture, `MegatronModule.cuda` staying on CPU, torch's norm for
   HybridStack's final norm when Transformer Engine is absent (each function's docstring says
   why).

Every patch here stands in for the device (CUDA calls, NCCL, the CUDA RNG, streams) or for an
absent Transformer Engine; tests/test_cpu_support.py lists each with that reason. Fixes that
a GPU run needs as well live in `nemo_tst.megatron_fixes`, which every launch applies; this
module's patches use its bookkeeping (`patch_attribute`, `restore`).
"""

import contextlib
import functools
import importlib
import logging
import types
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from nemo_tst.megatron_fixes import patch_attribute, restore
from nemo_tst.megatron_fixes import resolve as _resolve

__all__ = [
    "MEGATRON_NAMES",
    "MODEL_CPU_CONFIG",
    "TRAINER_CPU_ARGS",
    "causal_attention_mask",
    "disable_megatron_cpu",
    "enable_megatron_cpu",
    "is_enabled",
    "seed_model_parallel",
]

logger = logging.getLogger(__name__)

# The TransformerConfig fields a model built directly on CPU needs (USAGE, MODEL LEVEL): weights
# drawn on the CPU generator, and Megatron's fused CUDA/Apex kernels off.
MODEL_CPU_CONFIG = dict(
    use_cpu_initialization=True, bias_dropout_fusion=False, apply_rope_fusion=False,
    masked_softmax_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
)

# The Megatron-LM arguments a run needs on CPU beyond those of Megatron's plain-PyTorch layers
# (`nemo_tst.recipes.config.LOCAL_LAYERS_ARGS`, which a CPU run needs too): `--tst-cpu` makes
# each rank call enable_megatron_cpu() before Megatron builds anything, gloo replaces NCCL,
# weights are drawn on the CPU generator, and the bias-activation / bias-dropout functions run
# uncompiled (torch.compile's CPU code generation costs seconds per launch).
TRAINER_CPU_ARGS = (
    "--tst-cpu", "--distributed-backend", "gloo", "--use-cpu-initialization",
    "--no-bias-gelu-fusion", "--no-bias-dropout-fusion",
)

# ---------------------------------------------------------------------------------------------
# The CPU view of `torch`: what a patched Megatron module sees as its global name `torch`.
# ---------------------------------------------------------------------------------------------


def _cpu_device(device: Any) -> Any:
    """`device` with every CUDA form ("cuda", "cuda:0", torch.device("cuda", 1), 0) made CPU."""
    if isinstance(device, torch.device):
        return torch.device("cpu") if device.type == "cuda" else device
    if isinstance(device, str):
        return "cpu" if device.startswith("cuda") else device
    if isinstance(device, int) and not isinstance(device, bool):
        return "cpu"  # an int device in torch means a CUDA ordinal
    return device


class _DeviceMeta(type):
    """`torch.device` stand-in: `torch.device("cuda", i)` gives CPU; isinstance still works."""

    def __call__(cls, *args, **kwargs):
        real = torch.device(*args, **kwargs)
        return torch.device("cpu") if real.type == "cuda" else real

    def __instancecheck__(cls, obj):
        return isinstance(obj, torch.device)


class _CpuDevice(metaclass=_DeviceMeta):
    """Placeholder class; see `_DeviceMeta`."""


class _NullStream:
    """A CUDA stream/event stand-in: every operation is a no-op (CPU work is synchronous)."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):  # record, wait_stream, wait_event, synchronize, record_event...
        def noop(*args, **kwargs):
            return self if name == "record_event" else None

        return noop

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __eq__(self, other):
        return isinstance(other, _NullStream)

    def __hash__(self):
        return 0


def _wrap_factory(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def factory(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    return factory


_FACTORIES = (
    "arange", "as_tensor", "empty", "empty_like", "empty_strided", "eye", "full", "full_like",
    "linspace", "ones", "ones_like", "rand", "randint", "randn", "randperm", "tensor", "zeros",
    "zeros_like",
)  # fmt: skip


def _zero(*args, **kwargs):
    return 0


def _make_cuda_view() -> types.ModuleType:
    """`torch.cuda` as a patched Megatron module sees it: CPU device, no-op sync/streams/events,
    the CUDA RNG mapped onto the CPU generator, zero memory statistics."""
    view = _ForwardingModule("torch.cuda", torch.cuda)
    random_view = _ForwardingModule("torch.cuda.random", torch.cuda.random)

    def get_rng_state(device="cuda"):
        return torch.get_rng_state()

    def set_rng_state(new_state, device="cuda"):
        torch.set_rng_state(new_state)

    def manual_seed(seed):
        torch.manual_seed(seed)

    for mod in (view, random_view):
        mod.get_rng_state = get_rng_state
        mod.set_rng_state = set_rng_state
        mod.manual_seed = manual_seed
        mod.manual_seed_all = manual_seed
    view.random = random_view
    view.current_device = lambda: torch.device("cpu")
    view.set_device = lambda *a, **k: None
    view.synchronize = lambda *a, **k: None
    view.empty_cache = lambda *a, **k: None
    view.Stream = _NullStream
    view.Event = _NullStream
    view.current_stream = lambda *a, **k: _NullStream()
    view.default_stream = lambda *a, **k: _NullStream()
    view.stream = lambda *a, **k: contextlib.nullcontext()
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved",
                 "max_memory_reserved"):  # fmt: skip
        setattr(view, name, _zero)
    view.reset_peak_memory_stats = lambda *a, **k: None
    view.memory_stats = lambda *a, **k: {}
    return view


class _ForwardingModule(types.ModuleType):
    """A module object that forwards every attribute it does not define to `target`."""

    def __init__(self, name: str, target: types.ModuleType):
        super().__init__(name)
        self.__wrapped__ = target

    def __getattr__(self, name):  # only called for attributes not set on the view
        return getattr(self.__dict__["__wrapped__"], name)

    def __repr__(self):
        return f"<CPU view of {self.__wrapped__!r} (nemo_tst.cpu)>"


def _make_torch_view(device_count: Optional[int] = None) -> types.ModuleType:
    view = _ForwardingModule("torch", torch)
    view.cuda = _make_cuda_view()
    if device_count is not None:
        view.cuda.device_count = lambda: device_count
    view.device = _CpuDevice
    for name in _FACTORIES:
        setattr(view, name, _wrap_factory(getattr(torch, name)))
    return view


_TORCH_VIEWS: dict[Optional[int], types.ModuleType] = {}


def _torch_view(device_count: Optional[int] = None) -> types.ModuleType:
    """The shared CPU view; `device_count=1` gives the variant where torch.cuda.device_count()
    is 1 (for initialize.py, whose model-parallel init and seeding are skipped when it is 0)."""
    if device_count not in _TORCH_VIEWS:
        _TORCH_VIEWS[device_count] = _make_torch_view(device_count)
    return _TORCH_VIEWS[device_count]


# ---------------------------------------------------------------------------------------------
# Patch bookkeeping. `_PATCHES` declares every patch: the Megatron attribute it replaces, named
# "module:qualified.name", and how to make its replacement from the original. `_RELIED_ON`
# names what the patches read or call without replacing it, "(param)" marking a keyword they
# pass. The enable functions apply `_PATCHES` and nothing else; tests/test_cpu_support.py walks
# both lists against the installed megatron-core.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Patch:
    target: str
    """"module:qualified.name" of the Megatron attribute replaced."""
    make: Callable[[Any], Any]
    """The original -> the object put in its place."""
    trainer: bool = False
    """Only with `enable_megatron_cpu(trainer=True)` (megatron.training and what it alone uses)."""
    when: Optional[Callable[[], bool]] = None
    """If given, the patch applies only when this returns True at enable time."""
    bridge: bool = False
    """Only with `enable_bridge_cpu()` (Megatron-Bridge's trainer, `megatron.bridge`)."""


_PATCHES: list[_Patch] = []
_RELIED_ON: list[str] = []


def _relies_on(target: str) -> str:
    _RELIED_ON.append(target)
    return target


def _megatron_attr(target: str) -> Any:
    owner, name = _resolve(target)
    return getattr(owner, name)


def _cpu_view_of_torch(*module_names: str, trainer: bool = False,
                       device_count: Optional[int] = None, bridge: bool = False) -> None:
    """These modules see the CPU view of torch as their global `torch`."""
    for module_name in module_names:
        _PATCHES.append(_Patch(f"{module_name}:torch",
                               lambda original: _torch_view(device_count), trainer, bridge=bridge))


def _replace(target: str, *by_name_imports: str, trainer: bool = False,
             when: Optional[Callable[[], bool]] = None,
             bridge: bool = False) -> Callable[[Callable], Callable]:
    """Decorator: the function replaces `target` (keeping its signature), and a wrapper of it
    each of `by_name_imports`, the modules that bound the original under their own name."""

    def register(fn: Callable) -> Callable:
        _PATCHES.append(_Patch(target, lambda original: fn, trainer, when, bridge))
        for alias in by_name_imports:
            _PATCHES.append(_Patch(alias, lambda original: _wrapper_alias(fn), trainer, when,
                                   bridge))
        return fn

    return register


def _run_passing_as_cuda(*targets: str, trainer: bool = False, bridge: bool = False) -> None:
    """These functions run with CPU tensors passing as CUDA tensors (`_passing_as_cuda`)."""
    for target in targets:
        _PATCHES.append(_Patch(target, _passing_as_cuda, trainer, bridge=bridge))


_APPLIED: list[tuple[Any, str, Any, Any]] = []
_LOG_FILTERS: list[tuple[logging.Logger, logging.Filter]] = []
_ENABLED = False


def _patch(owner: Any, name: str, replacement: Any) -> None:
    patch_attribute(owner, name, replacement, _APPLIED, "_nemo_tst_cpu")


def _apply(trainer: bool, bridge: bool = False) -> None:
    for p in _PATCHES:
        if p.trainer == trainer and p.bridge == bridge and (p.when is None or p.when()):
            owner, name = _resolve(p.target)
            _patch(owner, name, p.make(getattr(owner, name)))


def _wrapper_alias(fn: Callable) -> Callable:
    """A second function object with the same behaviour, so each patched name has its own
    `__wrapped__` (the original bound at that name)."""

    @functools.wraps(fn, assigned=("__doc__", "__name__", "__qualname__"), updated=())
    def alias(*args, **kwargs):
        return fn(*args, **kwargs)

    return alias


# ---------------------------------------------------------------------------------------------
# Model level: megatron.core
# ---------------------------------------------------------------------------------------------

_cpu_view_of_torch(
    "megatron.core.models.common.embeddings.rotary_pos_embedding",  # inv_freq on current_device()
    "megatron.core.pipeline_parallel.p2p_communication",  # receive buffers, synchronize
    "megatron.core.pipeline_parallel.schedules",  # token counters created on "cuda"
    "megatron.core.tensor_parallel.data",  # broadcast_data's buffers on "cuda"
    "megatron.core.tensor_parallel.layers",  # weights on current_device() (GPU-init path)
    "megatron.core.tensor_parallel.mappings",  # communication buffers on current_device()
    "megatron.core.tensor_parallel.random",  # torch.cuda RNG state and manual_seed
    "megatron.core.transformer.dot_product_attention",  # softmax offset on current_device()
    "megatron.core.transformer.moe.router",  # router tensors on current_device()
    "megatron.core.transformer.moe.token_dispatcher",  # the all-to-all dispatcher's CUDA stream
    "megatron.core.transformer.utils",  # causal / sliding-window masks built on "cuda"
    "megatron.core.utils",  # current_device(), "cuda" tensors (e.g. the global memory buffer)
)


# -- the CUDA RNG tracker on the CPU generator -------------------------------------------------


@_replace("megatron.core.tensor_parallel.random:_get_cuda_rng_state")
def _get_cpu_rng_state(device="cuda", clone=False, graph_safe=False):
    """CPU stand-in for `_get_cuda_rng_state`: the CPU generator's state (the RNG tracker's
    states live on the CPU generator)."""
    if graph_safe:
        raise NotImplementedError("graph-safe (CUDA-graph) RNG states do not exist on CPU")
    return torch.get_rng_state()


@_replace("megatron.core.tensor_parallel.random:_set_cuda_rng_state")
def _set_cpu_rng_state(new_state, device=-1, graph_safe=False):
    """CPU stand-in for `_set_cuda_rng_state`: sets the CPU generator's state."""
    if graph_safe:
        raise NotImplementedError("graph-safe (CUDA-graph) RNG states do not exist on CPU")
    torch.set_rng_state(new_state)


# The tracker's fork() warns, through the logger named after its module, when the CPU RNG
# moves inside a fork; on CPU the tracked generator *is* the CPU generator, so it always moves.
_FORK_WARNING_LOGGER = "megatron.core.tensor_parallel.random"
_relies_on(f"{_FORK_WARNING_LOGGER}:CudaRNGStatesTracker.fork")


class _DropForkWarning(logging.Filter):
    def filter(self, record):
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


# -- CPU tensors passing as CUDA tensors inside a few Megatron functions -----------------------
# Tensor methods cannot be reached through a module's `torch`, so the functions below that call
# `t.cuda()` or compare `t.type()` with "torch.cuda.FloatTensor" run with both methods swapped
# for the duration of the call only (nothing else sees them).

_REAL_TENSOR_TYPE = torch.Tensor.type


def _tensor_stays(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
    return self


def _type_named_as_cuda(self, dtype=None, non_blocking=False, **kwargs):
    if dtype is None and not kwargs and self.device.type == "cpu":
        return _REAL_TENSOR_TYPE(self).replace("torch.", "torch.cuda.", 1)
    return _REAL_TENSOR_TYPE(self, dtype, non_blocking, **kwargs)


@contextlib.contextmanager
def _cpu_tensors_pass_as_cuda():
    """While active, `Tensor.cuda()` returns the tensor itself and `Tensor.type()` names a CPU
    tensor by its CUDA type ("torch.cuda.FloatTensor")."""
    saved = torch.Tensor.cuda, torch.Tensor.type
    torch.Tensor.cuda, torch.Tensor.type = _tensor_stays, _type_named_as_cuda
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.Tensor.type = saved


def _passing_as_cuda(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cpu_tensors_pass_as_cuda():
            return wrapper.__wrapped__(*args, **kwargs)

    return wrapper


_run_passing_as_cuda(
    # `weight.data.cuda()` on the tied embedding / output weight (PP > 1)
    "megatron.core.models.common.language_module.language_module:"
    "LanguageModule.setup_embeddings_and_output_layer",
    # `.cuda()` on the broadcast tensors; the package re-exports the function by name
    "megatron.core.tensor_parallel.data:broadcast_data",
    "megatron.core.tensor_parallel:broadcast_data",
)


# -- HybridStack's final norm without Transformer Engine ---------------------------------------

_HAVE_TE = _relies_on("megatron.core.extensions.transformer_engine:HAVE_TE")
_relies_on("megatron.core.transformer.torch_norm:WrappedTorchNorm")


def _without_te() -> bool:
    return not _megatron_attr(_HAVE_TE)


@_replace("megatron.core.models.hybrid.hybrid_block:TENorm", when=_without_te)
def _te_norm_stand_in(config, hidden_size, eps=1e-5, has_residual=False):
    """Stand-in for an absent Transformer Engine's `TENorm`, which `HybridStack` builds its
    final norm with whatever the layer spec says (so a HybridModel cannot be built without TE):
    Megatron's own TE-free `WrappedTorchNorm`, torch's LayerNorm or RMSNorm as
    config.normalization says, with the same eps. Its parameter is `weight` (and `bias` for
    LayerNorm), the names TENorm's parameters have. `has_residual` asks TE to fuse the
    residual add into the norm, which the final norm never does."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    return WrappedTorchNorm(config=config, hidden_size=hidden_size, eps=eps)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def is_enabled() -> bool:
    """Whether `enable_megatron_cpu` is in effect."""
    return _ENABLED


def enable_megatron_cpu(*, trainer: bool = True, force: bool = False) -> bool:
    """Patch Megatron-Core (and, with `trainer=True`, megatron.training) to run on CPU with gloo.

    Call it before building the model, before `initialize_model_parallel`, before `pretrain`.
    Safe to call twice (the second call does nothing). Returns True when the patches are in
    effect. When CUDA is available it patches nothing, logs why and returns False, unless
    `force=True` (then Megatron runs on CPU although a GPU is present).
    """
    global _ENABLED
    if _ENABLED:
        if trainer and not _TRAINER_ENABLED:
            _enable_trainer()
        return True
    if torch.cuda.is_available() and not force:
        logger.warning(
            "nemo_tst.cpu.enable_megatron_cpu: CUDA is available, so Megatron is left unpatched "
            "(pass force=True to run on CPU anyway)."
        )
        return False
    _apply(trainer=False)
    _add_log_filter(_FORK_WARNING_LOGGER, _DropForkWarning())
    _ENABLED = True
    if trainer:
        _enable_trainer()
    return True


def disable_megatron_cpu() -> None:
    """Undo `enable_megatron_cpu`: every patched attribute gets its original back."""
    global _ENABLED, _TRAINER_ENABLED, _BRIDGE_ENABLED
    restore(_APPLIED)
    while _LOG_FILTERS:
        lg, flt = _LOG_FILTERS.pop()
        lg.removeFilter(flt)
    _ENABLED = _TRAINER_ENABLED = _BRIDGE_ENABLED = False


def _add_log_filter(logger_name: str, flt: logging.Filter) -> None:
    lg = logging.getLogger(logger_name)
    lg.addFilter(flt)
    _LOG_FILTERS.append((lg, flt))


_relies_on("megatron.core.tensor_parallel:model_parallel_cuda_manual_seed")


def seed_model_parallel(seed: int) -> None:
    """Seed like Megatron's trainer does: `torch.manual_seed(seed)` then
    `model_parallel_cuda_manual_seed(seed)` (whose tracker states live on the CPU generator).

    Call after `initialize_model_parallel` and before building the model. With
    `use_cpu_initialization=True` every TP rank draws the full weight from the CPU generator and
    keeps its shard, so the initial model does not depend on the TP size.
    """
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)  # the tracker's add() restores it anyway; make the point explicit


def causal_attention_mask(seq_len: int, device: Any = "cpu") -> torch.Tensor:
    """Causal mask for Megatron's local attention: [1, 1, s, s] bool, True = masked (future)."""
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(diagonal=1)
    return mask.view(1, 1, seq_len, seq_len)


# ---------------------------------------------------------------------------------------------
# Trainer level: megatron.training.pretrain
# ---------------------------------------------------------------------------------------------

_TRAINER_ENABLED = False

_cpu_view_of_torch(
    # checkpoint save and load: "cuda" tensors, streams, synchronize
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.exchange_utils",
    # DDP: grad buffers on current_device(), communication streams, synchronize
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    # optimizers: norms, found-inf flags and scales as "cuda" tensors
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.optimizer",
    "megatron.core.rerun_state_machine",  # "cuda" tensors, CUDA RNG state
    "megatron.core.timers",  # synchronize
    "megatron.training.checkpointing",  # "cuda" tensors, CUDA RNG state saved and restored
    "megatron.training.training",  # "cuda" tensors, the DDP-init stream, empty_cache
    "megatron.training.utils.common_utils",  # "cuda" tensors, the memory report
    trainer=True,
)
# initialize.py additionally sees one "device": with torch.cuda.device_count() == 0 it skips
# both model-parallel initialization and seeding the RNG tracker.
_cpu_view_of_torch("megatron.training.initialize", trainer=True, device_count=1)

_relies_on("megatron.training.initialize:initialize_megatron(allow_no_cuda)")


@_replace("megatron.training.initialize:initialize_megatron",
          "megatron.training.training:initialize_megatron", trainer=True)
def _initialize_megatron(*args, **kwargs):
    """initialize_megatron with allow_no_cuda=True (pretrain passes nothing, so it asserts
    torch.cuda.is_available())."""
    kwargs["allow_no_cuda"] = True
    return _initialize_megatron.__wrapped__(*args, **kwargs)


@_replace("megatron.training.utils.common_utils:get_device_arch_version",
          "megatron.training.arguments:get_device_arch_version",
          "megatron.training.utils:get_device_arch_version", trainer=True)
def _get_device_arch_version():
    """No GPU architecture on CPU (Megatron reads cuda:0's properties): 0, i.e. "before
    Blackwell". validate_args then wants CUDA_DEVICE_MAX_CONNECTIONS=1 for TP/CP > 1."""
    return 0


@_replace("megatron.training.initialize:_warmup_jit_function", trainer=True)
def _warmup_jit_function(*args, **kwargs):
    """Skip the JIT warm-up on CPU.

    On a GPU it compiles the fused bias-GeLU/SwiGLU and bias-dropout-add functions (torch.compile
    in megatron-core 0.19) before the first step. On CPU that compile runs inductor and a C++
    compiler, about 2 s of CPU a launch, for functions the CPU arguments never call (bias-free
    linears, --no-bias-dropout-fusion); whatever a model does call compiles at its first call,
    to the same kernels. Skipping it also keeps the guarantee the warm-up would otherwise break
    here: its `torch.rand(..., device="cuda")` would draw from the CPU generator that
    `--use-cpu-initialization` draws the weights from, making the initial model depend on TP."""
    return None


@_replace("megatron.core.transformer.module:MegatronModule.cuda", trainer=True)
def _module_cpu(self, device=None):
    """MegatronModule.cuda on CPU: stay on CPU (get_model calls model.cuda(current_device()))."""
    return self


_run_passing_as_cuda(
    # `assert param.grad.type() == 'torch.cuda.FloatTensor'`; optimizer.py imports it by name
    "megatron.core.optimizer.clip_grads:clip_grad_by_total_norm_fp32",
    "megatron.core.optimizer.optimizer:clip_grad_by_total_norm_fp32",
    # both optimizers sort their parameters by `.type()`
    "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.__init__",
    "megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params.__init__",
    # `.cuda()` on the loaded shards (--ckpt-fully-parallel-load)
    "megatron.core.dist_checkpointing.exchange_utils:exchange_loaded_tensors_gather_rounds",
    "megatron.core.dist_checkpointing.exchange_utils:exchange_loaded_tensors_broadcast",
    # `.cuda()` on the per-parameter hashes (--check-weight-hash-across-dp-replicas-interval);
    # training.py imports it by name
    "megatron.core.utils:check_param_hashes_across_dp_replicas",
    "megatron.training.training:check_param_hashes_across_dp_replicas",
    trainer=True,
)


def _enable_trainer() -> None:
    global _TRAINER_ENABLED
    try:
        importlib.import_module("megatron.training.training")
    except ImportError as exc:  # pragma: no cover - megatron.training ships with megatron-core
        logger.warning("nemo_tst.cpu: megatron.training not importable (%s); trainer unpatched", exc)
        return
    _apply(trainer=True)
    _TRAINER_ENABLED = True


# ---------------------------------------------------------------------------------------------
# Megatron-Bridge's trainer: megatron.bridge.training.pretrain (Bridge 0.6)
# ---------------------------------------------------------------------------------------------

_BRIDGE_ENABLED = False

_cpu_view_of_torch(
    "megatron.bridge.training.train",  # "cuda" exit flags, synchronize, empty_cache
    "megatron.bridge.training.eval",  # "cuda" exit flags, synchronize, empty_cache
    "megatron.bridge.training.utils.train_utils",  # grad-norm buffers on "cuda", memory report
    "megatron.bridge.training.checkpointing",  # "cuda" tensors, the CUDA RNG state saved/loaded
    "megatron.bridge.training.setup",  # the start-time tensor reduced on "cuda"
    "megatron.bridge.data.loaders",  # the do-train/valid/test flags broadcast on "cuda"
    "megatron.bridge.models.model_provider",  # set_device, model.cuda(current_device())
    "megatron.training.models.dist_utils",  # the DDP-wrap CUDA stream (Bridge's get_model)
    bridge=True, trainer=True,
)
# Bridge's initialize.py seeds the RNG tracker only when torch.cuda.device_count() > 0.
_cpu_view_of_torch("megatron.bridge.training.initialize", device_count=1, bridge=True,
                   trainer=True)

_relies_on("megatron.bridge.training.initialize:initialize_megatron(allow_no_cuda)")


@_replace("megatron.bridge.training.initialize:initialize_megatron",
          "megatron.bridge.training.setup:initialize_megatron", trainer=True, bridge=True)
def _bridge_initialize_megatron(*args, **kwargs):
    """Bridge's initialize_megatron with allow_no_cuda=True (setup() passes nothing, so it
    asserts torch.cuda.is_available())."""
    kwargs["allow_no_cuda"] = True
    return _bridge_initialize_megatron.__wrapped__(*args, **kwargs)


@_replace("megatron.bridge.training.initialize:_warmup_jit_function", trainer=True, bridge=True)
def _bridge_warmup_jit_function(model_config, micro_batch_size):
    """Skip Bridge's JIT warm-up on CPU: its warm-up tensors are made on "cuda" (see
    `_warmup_jit_function` above for why skipping changes no result)."""
    return None


_run_passing_as_cuda(
    # `.cuda()` on every batch tensor (phase 2, validation and test batches)
    "megatron.bridge.training.gpt_step:get_batch_from_iterator",
    # `.cuda()` on the evaluation loss accumulators
    "megatron.bridge.training.eval:evaluate",
    trainer=True, bridge=True,
)


def bridge_cpu_settings(cfg) -> None:
    """Set what a Megatron-Bridge `ConfigContainer` needs on CPU, in place (the counterpart of
    `TRAINER_CPU_ARGS` and the local layers' arguments): gloo, megatron-core's plain-PyTorch
    layer spec (`local_layer_spec`: no Transformer Engine), weights on the CPU generator, and
    every fused CUDA/Apex kernel off."""
    from megatron.bridge.models.gpt_provider import local_layer_spec

    cfg.dist.distributed_backend = "gloo"
    cfg.model.transformer_layer_spec = local_layer_spec
    for name, value in MODEL_CPU_CONFIG.items():
        setattr(cfg.model, name, value)
    for name in ("bias_activation_fusion", "cross_entropy_loss_fusion"):
        setattr(cfg.model, name, False)
    cfg.dataset.num_workers = 0


def enable_bridge_cpu(*, force: bool = False) -> bool:
    """`enable_megatron_cpu()` plus the patches Megatron-Bridge's `pretrain` needs on CPU.

    Call it before building the containers' model or calling Bridge's `pretrain`. Megatron-Bridge
    must be importable (it needs Transformer Engine, or, in tests, tests/te_absent_standin.py).
    """
    global _BRIDGE_ENABLED
    if not enable_megatron_cpu(trainer=True, force=force):
        return False
    if not _BRIDGE_ENABLED:
        for module in _BRIDGE_MODULES:
            importlib.import_module(module)
        _apply(trainer=True, bridge=True)
        _BRIDGE_ENABLED = True
    return True


_BRIDGE_MODULES = ("megatron.bridge.training.pretrain", "megatron.bridge.training.gpt_step")
"""Imported before the Bridge patches apply (they import every patched module)."""


MEGATRON_NAMES: tuple[str, ...] = tuple(
    p.target for p in _PATCHES if not p.bridge) + tuple(n for n in _RELIED_ON if ".bridge." not in n)
"""Every Megatron name this module patches or relies on, as "module:qualified.name" (with
"(param)" where it passes that keyword): what tests/test_cpu_support.py checks against the
installed megatron-core."""

BRIDGE_CPU_NAMES: tuple[str, ...] = tuple(
    p.target for p in _PATCHES if p.bridge) + tuple(n for n in _RELIED_ON if ".bridge." in n)
"""Every Megatron-Bridge name `enable_bridge_cpu` patches or relies on, checked by
tests/test_cpu_support.py against the installed Megatron-Bridge."""
