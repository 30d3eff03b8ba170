"""Fixes to megatron-core 0.19 that every launch needs, on any device.

Each is a defect a plain `pip install megatron-core` run meets on a GPU as much as on a CPU, so
both integrations apply them on the path every launch takes (`nemo_tst.training.pretrain`,
`nemo_tst.bridge`), before Megatron initializes. `nemo_tst.cpu` holds what only a CPU run
needs, and uses the bookkeeping below for its own stand-ins.

- The dataset helpers: `initialize_megatron` runs `compile_helpers()` on global rank 0, which
  runs `make` in the installed package and exits the process when that fails. The wheel ships
  the compiled `helpers_cpp` extension but no Makefile, so every launch from a pip install
  would exit. With the extension importable there is nothing to build.
- The distributed optimizer without Apex or Transformer Engine (a pip install with
  `--transformer-impl local`): its resume asserts before the first step and restores Adam's
  step wrongly; with fp32 parameters it copies into a leaf that requires grad. Each fix below
  says what goes wrong and how it is mended.
  Megatron-Bridge's `initialize_megatron` imports `compile_helpers` by name: patched there
  too once Bridge is imported.
- Synchronous torch_dist saves: the writer asks for its result queue from a multiprocessing
  Manager started with "spawn" (a fresh interpreter importing torch and the trainer's main
  module, seconds at every launch's first save) for a queue that one thread of this process
  fills and the same process reads. A synchronous save gets an in-process queue; asynchronous
  saves (--async-save) keep the Manager.

Every patch follows one rule: one `Patch` entry naming the Megatron attribute
("module:qualified.name") and what replaces it; the replacement keeps the original as
`__wrapped__`; applying twice is a no-op. `MEGATRON_NAMES` lists every name used, and
tests/test_megatron_fixes.py checks each against the installed megatron-core.
"""

import importlib
import queue
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

__all__ = ["MEGATRON_NAMES", "Patch", "apply_megatron_fixes", "patch_attribute", "resolve"]


@dataclass(frozen=True)
class Patch:
    target: str
    """"module:qualified.name" of the Megatron attribute replaced."""
    make: Callable[[Any], Any]
    """The original -> the object put in its place."""
    when: Optional[Callable[[], bool]] = None
    """If given, the patch applies only when this returns True at apply time."""


def resolve(target: str) -> tuple[Any, str]:
    """(owner, attribute name) of "module:qualified.name" (a "(param)" suffix is ignored)."""
    module_name, _, path = target.partition(":")
    owner = importlib.import_module(module_name)
    *outer, name = path.split("(")[0].split(".")
    for part in outer:
        owner = getattr(owner, part)
    return owner, name


INHERITED = object()
"""Recorded as the original of a method the owner only inherited: restore by deleting ours."""


def patch_attribute(owner: Any, name: str, replacement: Any, applied: list, marker: str) -> None:
    """Put `replacement` at `owner.name`, keeping the original as its `__wrapped__`, and record
    (owner, name, original, replacement) in `applied`. An attribute already carrying `marker`
    is left alone, so applying twice never wraps twice."""
    original = getattr(owner, name)
    if getattr(original, marker, False):
        return
    own = name in vars(owner)
    try:
        replacement.__wrapped__ = original
        setattr(replacement, marker, True)
    except (AttributeError, TypeError):
        pass
    setattr(owner, name, replacement)
    applied.append((owner, name, original if own else INHERITED, replacement))


def restore(applied: list) -> None:
    """Undo the patches recorded in `applied`, newest first."""
    while applied:
        owner, name, original, _ = applied.pop()
        if original is INHERITED:
            delattr(owner, name)
        else:
            setattr(owner, name, original)


_PATCHES: list[Patch] = []
_RELIED_ON: list[str] = []
_APPLIED: list = []
_MARKER = "_nemo_tst_fix"


def _replace(target: str, when: Optional[Callable[[], bool]] = None) -> Callable[[Callable], Callable]:
    def register(fn: Callable) -> Callable:
        _PATCHES.append(Patch(target, lambda original: fn, when))
        return fn

    return register


def _relies_on(target: str) -> str:
    _RELIED_ON.append(target)
    return target


def apply_megatron_fixes() -> None:
    """Apply every fix (those whose condition holds). Call before Megatron initializes; safe
    to call again."""
    for p in _PATCHES:
        if p.when is None or p.when():
            owner, name = resolve(p.target)
            patch_attribute(owner, name, p.make(getattr(owner, name)), _APPLIED, _MARKER)


def remove_megatron_fixes() -> None:
    """Give every patched attribute its original back (tests)."""
    restore(_APPLIED)


# -- the dataset helpers -----------------------------------------------------------------------


def _helpers_unless_shipped(build: Callable) -> None:
    """Run `build` (Megatron's `make`) only when the compiled `helpers_cpp` extension is
    missing: the wheel ships the extension, not the Makefile `make` needs."""
    try:
        importlib.import_module("megatron.core.datasets.helpers_cpp")
    except ImportError:
        return build()


@_replace("megatron.core.datasets.utils:compile_helpers")
def _compile_helpers():
    """compile_helpers, building nothing when the shipped extension imports."""
    return _helpers_unless_shipped(_compile_helpers.__wrapped__)


def _bridge_imported() -> bool:
    """Megatron-Bridge's initialize module is loaded (the Bridge adapter imported it)."""
    return "megatron.bridge.training.initialize" in sys.modules


@_replace("megatron.bridge.training.initialize:compile_helpers", when=_bridge_imported)
def _bridge_compile_helpers():
    """Megatron-Bridge's `initialize_megatron` calls compile_helpers under its own name."""
    return _helpers_unless_shipped(_bridge_compile_helpers.__wrapped__)


# -- the distributed optimizer without Apex or Transformer Engine ------------------------------

_HAVE_APEX_OR_TE = _relies_on("megatron.core.optimizer.distrib_optimizer:HAVE_APEX_OR_TE")
_relies_on("megatron.core.optimizer.distrib_optimizer:"
           "DistributedOptimizer._init_optimizer_states_with_dummy_values")


def _without_apex_or_te() -> bool:
    owner, name = resolve(_HAVE_APEX_OR_TE)
    return not getattr(owner, name)


@_replace("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.sharded_state_dict",
          when=_without_apex_or_te)
def _distopt_sharded_state_dict(self, model_sharded_state_dict=None, is_loading=False, *args,
                                **kwargs):
    """DistributedOptimizer.sharded_state_dict for loading before the first step.

    Without Apex/TE `state_dict()` reads the step from the torch optimizer's per-parameter
    state, which is empty until the first step, so `--load` with `--use-distributed-optimizer`
    asserts. Fill the state with Megatron's own dummy step first, as Megatron does for the
    fsdp_dtensor format; the load then overwrites it."""
    if is_loading and not self.optimizer.state:
        self._init_optimizer_states_with_dummy_values()
    if model_sharded_state_dict is None:
        model_sharded_state_dict = {}
    return _distopt_sharded_state_dict.__wrapped__(
        self, model_sharded_state_dict, is_loading, *args, **kwargs
    )


@_replace("megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.load_state_dict",
          when=_without_apex_or_te)
def _distopt_load_state_dict(self, state_dict):
    """DistributedOptimizer.load_state_dict, then give every parameter its own, correct `step`.

    Without Apex/TE the step lives in torch Adam's per-parameter state, and the load gets it
    wrong twice: it puts one shared tensor in every parameter's state, which torch's Adam then
    increments once per parameter per iteration; and the per-parameter state it copies in
    afterwards carries the pre-load placeholder step. Either way the bias correction after a
    resume differs from the uninterrupted run. The step saved in the checkpoint's param_groups
    is the true one: set it on each parameter, on the device of that parameter's state."""
    result = _distopt_load_state_dict.__wrapped__(self, state_dict)
    groups = state_dict.get("optimizer", {}).get("param_groups", [])
    steps = {float(g["step"]) for g in groups if g.get("step") is not None}
    if len(steps) == 1:
        step = steps.pop()
        for state in self.optimizer.state.values():
            if "step" in state:
                old = state["step"]
                device = old.device if isinstance(old, torch.Tensor) else None
                state["step"] = torch.tensor(step, dtype=torch.float32, device=device)
    return result


@_replace("megatron.core.optimizer.distrib_optimizer:"
          "DistributedOptimizer._set_main_param_and_optimizer_states")
def _set_main_param_and_optimizer_states(self, *args, **kwargs):
    """DistributedOptimizer._set_main_param_and_optimizer_states under torch.no_grad(): with fp32
    params the main param is a view of the model param (a leaf that requires grad) and its
    `copy_` into that view raises outside no_grad (bf16 params are unaffected)."""
    with torch.no_grad():
        return _set_main_param_and_optimizer_states.__wrapped__(self, *args, **kwargs)


# -- synchronous torch_dist saves without a spawned Manager process ----------------------------

_SYNC_SAVE = threading.local()


@_replace("megatron.core.dist_checkpointing.strategies.torch:TorchDistSaveShardedStrategy.save")
def _torch_dist_save(self, sharded_state_dict, checkpoint_dir):
    """TorchDistSaveShardedStrategy.save (the synchronous torch_dist save), its writers'
    results collected in this process (`_write_results_queue`)."""
    _SYNC_SAVE.active = True
    try:
        return _torch_dist_save.__wrapped__(self, sharded_state_dict, checkpoint_dir)
    finally:
        _SYNC_SAVE.active = False


@_replace("megatron.core.dist_checkpointing.strategies.filesystem_async:get_write_results_queue")
def _write_results_queue(*args, **kwargs):
    """get_write_results_queue: an in-process queue inside a synchronous save, else Megatron's
    Manager queue."""
    if getattr(_SYNC_SAVE, "active", False):
        return queue.Queue()
    return _write_results_queue.__wrapped__(*args, **kwargs)


MEGATRON_NAMES: tuple[str, ...] = tuple(
    n for n in [p.target for p in _PATCHES] + _RELIED_ON if not n.startswith("megatron.bridge."))
"""Every megatron-core name this module patches or relies on, as "module:qualified.name"."""

BRIDGE_FIX_NAMES: tuple[str, ...] = tuple(
    n for n in [p.target for p in _PATCHES] + _RELIED_ON if n.startswith("megatron.bridge."))
"""Every Megatron-Bridge name this module patches (applied once the adapter imported Bridge)."""
