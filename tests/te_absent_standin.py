"""Test-only: let `import megatron.bridge` run where Transformer Engine is absent.

Megatron-Bridge 0.6 has one unguarded Transformer Engine import on the `import megatron.bridge`
path: `megatron/bridge/peft/lora_layers.py` line 20, `import transformer_engine.pytorch as te`.
That module needs `te` only to evaluate the return annotations of its TE-fused LoRA class
(`-> te.ops.Sequential`) when the module executes; every other Transformer Engine use on the
pretraining path is behind a `try: import` guard and sees TE as absent.

`install()` adds an import hook that hands exactly that module, while it executes, an
`AbsentTransformerEngine` object in place of `transformer_engine`. Attribute access on it gives
further stand-ins (so the annotations evaluate); every use (calling, isinstance, iteration,
truth value) raises ImportError, so LoRA's TE-fused path fails loudly if anything reaches it.
Nothing is put in `sys.modules`: every other `import transformer_engine` (megatron-core has
about 20 guarded ones) still fails, exactly as on a machine without TE. A stub package on
`sys.path` would flip those guards and is deliberately not used.

This is a test stand-in: product code (`nemo_tst`) never imports it. The CPU runs of the
Bridge adapter (tests, docs/bridge.md's CPU command via tests/bridge_cpu_launch.py) use it.
"""

from __future__ import annotations

import builtins
import importlib.abc
import importlib.machinery
import sys

__all__ = ["AbsentTransformerEngine", "THE_MODULE", "install", "installed", "uninstall"]

THE_MODULE = "megatron.bridge.peft.lora_layers"
"""The one module that gets the stand-in."""

_MESSAGE = (
    "Transformer Engine is absent: {name} is a test stand-in (tests/te_absent_standin.py) that "
    "only lets megatron.bridge.peft.lora_layers import; its TE-fused LoRA path needs "
    "transformer_engine installed"
)


class _AbsentMeta(type):
    def __instancecheck__(cls, obj):
        raise ImportError(_MESSAGE.format(name="transformer_engine"))


class AbsentTransformerEngine:
    """`transformer_engine` (and any attribute path below it) for THE_MODULE only."""

    __slots__ = ("_name",)

    def __init__(self, name: str = "transformer_engine"):
        object.__setattr__(self, "_name", name)

    def __getattr__(self, attr: str):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        return AbsentTransformerEngine(f"{self._name}.{attr}")

    def _refuse(self, *args, **kwargs):
        raise ImportError(_MESSAGE.format(name=self._name))

    __call__ = _refuse
    __iter__ = _refuse
    __bool__ = _refuse
    __instancecheck__ = _refuse
    __subclasscheck__ = _refuse
    __mro_entries__ = _refuse

    def __repr__(self):
        return f"<absent {self._name} (tests/te_absent_standin.py)>"


def _standin_import(real_import):
    def import_(name, globals=None, locals=None, fromlist=(), level=0):
        if (
            level == 0
            and (name == "transformer_engine" or name.startswith("transformer_engine."))
            and (globals or {}).get("__name__") == THE_MODULE
        ):
            top = AbsentTransformerEngine("transformer_engine")
            if fromlist:  # `from transformer_engine.x import y` gets the submodule stand-in
                node = top
                for part in name.split(".")[1:]:
                    node = getattr(node, part)
                return node
            return top  # `import transformer_engine.pytorch as te` walks attributes from here
        return real_import(name, globals, locals, fromlist, level)

    return import_


class _Loader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        real_import = builtins.__import__
        builtins.__import__ = _standin_import(real_import)
        try:
            self._loader.exec_module(module)
        finally:
            builtins.__import__ = real_import


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != THE_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


_FINDER = _Finder()


def install() -> None:
    """Add the hook (idempotent). Call before anything imports megatron.bridge."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def installed() -> bool:
    return _FINDER in sys.meta_path
