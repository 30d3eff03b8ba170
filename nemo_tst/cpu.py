"""Run Megatron-Core (and later Megatron-LM's trainer) on CPU with gloo. Opt-in; tests/CI/demo only.

USAGE (model level: build a GPTModel and run forward/backward on CPU)::

    from nemo_tst import cpu
    cpu.enable_megatron_cpu()                 # FIRST: before building any model
    torch.distributed.init_process_group("gloo", rank=r, world_size=w)   # MASTER_ADDR/PORT set
    parallel_state.initialize_model_parallel(tp, pp, expert_model_parallel_size=ep)
    cpu.seed_model_parallel(seed)             # = torch.manual_seed + model_parallel_cuda_manual_seed
    model = GPTModel(TransformerConfig(..., use_cpu_initialization=True),
                     get_gpt_layer_local_spec(...), vocab_size, max_seq_len,
                     position_embedding_type="rope")
    mask = cpu.causal_attention_mask(seq_len)         # [1, 1, s, s] bool, True = masked
    loss = model(ids, position_ids, mask, labels=labels)   # [b, s] fp32 per-token CE
    ...
    parallel_state.destroy_model_parallel(); torch.distributed.destroy_process_group()

Nothing else in `nemo_tst` imports this module: only tests, CI and the CPU demo path do.
"""

import contextlib
import functools
import importlib
import logging
import types
from typing import Any, Callable, Optional

import torch

__all__ = [
    "causal_attention_mask",
    "disable_megatron_cpu",
    "enable_megatron_cpu",
    "is_enabled",
    "seed_model_parallel",
]

logger = logging.getLogger(__name__)

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
# Patch bookkeeping: every patch is (owner, attribute, original, replacement); the replacement
# carries the original as `__wrapped__`; `disable_megatron_cpu` puts the originals back.
# ---------------------------------------------------------------------------------------------

_APPLIED: list[tuple[Any, str, Any, Any]] = []
_LOG_FILTERS: list[tuple[logging.Logger, logging.Filter]] = []
_ENABLED = False


def _patch(owner: Any, name: str, replacement: Any) -> None:
    original = getattr(owner, name)
    if getattr(original, "_nemo_tst_cpu", False):  # already ours (defensive: never wrap twice)
        return
    own = name in vars(owner)  # False for an inherited method: restore by deleting ours
    try:
        replacement.__wrapped__ = original
        replacement._nemo_tst_cpu = True
    except (AttributeError, TypeError):
        pass
    setattr(owner, name, replacement)
    _APPLIED.append((owner, name, original if own else _INHERITED, replacement))


_INHERITED = object()


def _replace(module_name: str, name: str, *, trainer: bool = False) -> Callable[[Callable], Callable]:
    """Decorator: the function replaces `module_name.name` (it keeps the signature)."""

    def register(fn: Callable) -> Callable:
        _FUNCTION_PATCHES.append((module_name, name, fn, trainer))
        return fn

    return register


_FUNCTION_PATCHES: list[tuple[str, str, Callable, bool]] = []


# Modules whose global `torch` becomes the CPU view (see the table in the module docstring).
_MODEL_VIEW_MODULES = (
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.data",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.module",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.moe.moe_layer",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.shared_experts",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.utils",
)


# -- the CUDA RNG tracker on the CPU generator -------------------------------------------------


@_replace("megatron.core.tensor_parallel.random", "_get_cuda_rng_state")
def _get_cpu_rng_state(device="cuda", clone=False, graph_safe=False):
    """CPU stand-in for random.py's `_get_cuda_rng_state`: the CPU generator's state."""
    if graph_safe:
        raise NotImplementedError("graph-safe (CUDA-graph) RNG states do not exist on CPU")
    return torch.get_rng_state()


@_replace("megatron.core.tensor_parallel.random", "_set_cuda_rng_state")
def _set_cpu_rng_state(new_state, device=-1, graph_safe=False):
    """CPU stand-in for random.py's `_set_cuda_rng_state`: sets the CPU generator's state."""
    if graph_safe:
        raise NotImplementedError("graph-safe (CUDA-graph) RNG states do not exist on CPU")
    torch.set_rng_state(new_state)


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


def _patch_callers(callers) -> None:
    for module_name, path in callers:
        owner = importlib.import_module(module_name)
        *outer, name = path.split(".")
        for part in outer:
            owner = getattr(owner, part)
        _patch(owner, name, _passing_as_cuda(getattr(owner, name)))


# (module, attribute path) of each function that runs under `_cpu_tensors_pass_as_cuda`.
_MODEL_CUDA_CALLERS = (
    # language_module.py:307 `weight.data = weight.data.cuda()` (tied embeddings with PP > 1)
    ("megatron.core.models.common.language_module.language_module",
     "LanguageModule.setup_embeddings_and_output_layer"),
    # data.py:84 `data[key].cuda()` (tensor_parallel.broadcast_data)
    ("megatron.core.tensor_parallel.data", "broadcast_data"),
    ("megatron.core.tensor_parallel", "broadcast_data"),  # the package re-exports it
)  # fmt: skip


class _DropForkWarning(logging.Filter):
    """`CudaRNGStatesTracker.fork` warns when the CPU RNG moves inside a fork; on CPU the tracked
    generator *is* the CPU generator, so it always moves (random.py:329-333)."""

    def filter(self, record):
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


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
    view = _torch_view()
    for module_name in _MODEL_VIEW_MODULES:
        module = importlib.import_module(module_name)
        _patch(module, "torch", view)
    for module_name, name, fn, for_trainer in _FUNCTION_PATCHES:
        if not for_trainer:
            _patch(importlib.import_module(module_name), name, fn)
    _patch_callers(_MODEL_CUDA_CALLERS)
    _add_log_filter("megatron.core.tensor_parallel.random", _DropForkWarning())
    _ENABLED = True
    if trainer:
        _enable_trainer()
    return True


def disable_megatron_cpu() -> None:
    """Undo `enable_megatron_cpu`: every patched attribute gets its original back."""
    global _ENABLED, _TRAINER_ENABLED
    while _APPLIED:
        owner, name, original, _ = _APPLIED.pop()
        if original is _INHERITED:
            delattr(owner, name)
        else:
            setattr(owner, name, original)
    while _LOG_FILTERS:
        lg, flt = _LOG_FILTERS.pop()
        lg.removeFilter(flt)
    _ENABLED = _TRAINER_ENABLED = False


def _add_log_filter(logger_name: str, flt: logging.Filter) -> None:
    lg = logging.getLogger(logger_name)
    lg.addFilter(flt)
    _LOG_FILTERS.append((lg, flt))


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

# Modules (trainer path) whose global `torch` becomes the CPU view.
_TRAINER_VIEW_MODULES = (
    "megatron.training.training",
    "megatron.training.checkpointing",
    "megatron.training.utils.common_utils",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.rerun_state_machine",
    "megatron.core.timers",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
)
# initialize.py additionally sees one "device" so that it initializes model parallelism and
# seeds the RNG tracker (both skipped when torch.cuda.device_count() == 0).
_ONE_DEVICE_VIEW_MODULES = ("megatron.training.initialize",)


@_replace("megatron.training.initialize", "initialize_megatron", trainer=True)
def _initialize_megatron(*args, **kwargs):
    """initialize_megatron with allow_no_cuda=True (pretrain passes nothing, so it asserts)."""
    kwargs["allow_no_cuda"] = True
    return _initialize_megatron.__wrapped__(*args, **kwargs)


@_replace("megatron.core.datasets.utils", "compile_helpers", trainer=True)
def _compile_helpers():
    """Skip `make` when the compiled helpers_cpp extension is already importable (the wheel ships
    the .so but not the Makefile)."""
    try:
        importlib.import_module("megatron.core.datasets.helpers_cpp")
    except ImportError:
        return _compile_helpers.__wrapped__()


@_replace("megatron.training.utils.common_utils", "get_device_arch_version", trainer=True)
def _get_device_arch_version():
    """No GPU architecture on CPU: 0, i.e. "before Blackwell" (common_utils.py:502-504 reads
    cuda:0's properties). validate_args then wants CUDA_DEVICE_MAX_CONNECTIONS=1 for TP/CP > 1."""
    return 0


@_replace("megatron.training.initialize", "_warmup_jit_function", trainer=True)
def _warmup_jit_function(*args, **kwargs):
    """The JIT warm-up draws `torch.rand(..., device="cuda")` sized by TP (initialize.py:497-558).
    On a GPU that moves the CUDA generator; on CPU it would move the CPU generator that
    `--use-cpu-initialization` draws the weights from, making the initial model depend on TP.
    Run it with the CPU generator forked, as it would be on a GPU."""
    with torch.random.fork_rng(devices=[]):
        return _warmup_jit_function.__wrapped__(*args, **kwargs)


def _distopt_sharded_state_dict(self, model_sharded_state_dict=None, is_loading=False, **kwargs):
    """DistributedOptimizer.sharded_state_dict for loading before the first step.

    Without Apex/TE (always so on CPU) `state_dict()` reads the step from the torch optimizer's
    per-parameter state (distrib_optimizer.py:837-839), which is empty until the first step, so
    `--load` with `--use-distributed-optimizer` asserts. Fill the state with Megatron's own dummy
    step first, as it does for the fsdp_dtensor format (distrib_optimizer.py:1642-1643); the
    load then overwrites it."""
    if is_loading and not self.optimizer.state:
        self._init_optimizer_states_with_dummy_values()
    if model_sharded_state_dict is None:
        model_sharded_state_dict = {}
    return _distopt_sharded_state_dict.__wrapped__(
        self, model_sharded_state_dict, is_loading, **kwargs
    )


def _distopt_load_state_dict(self, state_dict):
    """DistributedOptimizer.load_state_dict, then give every parameter its own, correct `step`.

    Without Apex/TE the step lives in torch Adam's per-parameter state, and the load gets it
    wrong twice: it puts one shared tensor in every parameter's state (distrib_optimizer.py:
    1024-1030), which torch's Adam then increments once per parameter per iteration; and the
    per-parameter state it copies in afterwards carries the pre-load placeholder step. Either
    way the bias correction after a resume differs from the uninterrupted run. The step saved in
    the checkpoint's param_groups is the true one: set it on each parameter."""
    result = _distopt_load_state_dict.__wrapped__(self, state_dict)
    groups = state_dict.get("optimizer", {}).get("param_groups", [])
    steps = {float(g["step"]) for g in groups if g.get("step") is not None}
    if len(steps) == 1:
        step = steps.pop()
        for state in self.optimizer.state.values():
            if "step" in state:
                state["step"] = torch.tensor(step, dtype=torch.float32)
    return result


def _set_main_param_and_optimizer_states(self, *args, **kwargs):
    """DistributedOptimizer._set_main_param_and_optimizer_states under torch.no_grad(): with fp32
    params the main param is a view of the model param (a leaf that requires grad) and the
    `copy_` at distrib_optimizer.py:1225 raises outside no_grad (bf16 params are unaffected)."""
    with torch.no_grad():
        return _set_main_param_and_optimizer_states.__wrapped__(self, *args, **kwargs)


def _module_cpu(self, device=None):
    """MegatronModule.cuda on CPU: stay on CPU (get_model calls model.cuda(current_device()))."""
    return self


_TRAINER_CUDA_CALLERS = (
    # clip_grads.py:174 `assert param.grad.type() == 'torch.cuda.FloatTensor'`
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32"),  # imported by name
    # distrib_optimizer.py:401,466,758 and optimizer.py:1009,1028 sort params by `.type()`
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.__init__"),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__"),
)  # fmt: skip

_ALIASES = (
    ("megatron.training.training", "initialize_megatron", _initialize_megatron),
    ("megatron.training.arguments", "get_device_arch_version", _get_device_arch_version),
    ("megatron.training.utils", "get_device_arch_version", _get_device_arch_version),
)  # fmt: skip


def _enable_trainer() -> None:
    global _TRAINER_ENABLED
    try:
        importlib.import_module("megatron.training.training")
    except ImportError as exc:  # pragma: no cover - megatron.training ships with megatron-core
        logger.warning("nemo_tst.cpu: megatron.training not importable (%s); trainer unpatched", exc)
        return
    for module_name in _TRAINER_VIEW_MODULES:
        _patch(importlib.import_module(module_name), "torch", _torch_view())
    for module_name in _ONE_DEVICE_VIEW_MODULES:
        _patch(importlib.import_module(module_name), "torch", _torch_view(device_count=1))
    for module_name, name, fn, for_trainer in _FUNCTION_PATCHES:
        if for_trainer:
            _patch(importlib.import_module(module_name), name, fn)
    # Modules that imported a patched function by name: patch those references too.
    for module_name, name, fn in _ALIASES:
        _patch(importlib.import_module(module_name), name, _wrapper_alias(fn))
    _patch_callers(_TRAINER_CUDA_CALLERS)
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE, DistributedOptimizer

    if not HAVE_APEX_OR_TE:
        _patch(DistributedOptimizer, "sharded_state_dict", _distopt_sharded_state_dict)
        _patch(DistributedOptimizer, "load_state_dict", _distopt_load_state_dict)
    _patch(
        DistributedOptimizer,
        "_set_main_param_and_optimizer_states",
        _set_main_param_and_optimizer_states,
    )
    from megatron.core.transformer.module import MegatronModule

    _patch(MegatronModule, "cuda", _module_cpu)
    _TRAINER_ENABLED = True


def _wrapper_alias(fn: Callable) -> Callable:
    """A second function object with the same behaviour, so each patched name has its own
    `__wrapped__` (the original bound at that name)."""

    @functools.wraps(fn, assigned=("__doc__", "__name__", "__qualname__"), updated=())
    def alias(*args, **kwargs):
        return fn(*args, **kwargs)

    return alias
