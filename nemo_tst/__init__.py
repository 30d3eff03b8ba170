"""nemo-tst: Token-Superposition Training for Megatron-Core / NeMo pretraining.

Layers, each knowing only those below it:
    nemo_tst.superposition   the TST math: bags, embedding, multi-hot loss (torch + megatron.core)
    nemo_tst.core            what a run is, for any trainer: settings, plan, data stream,
                             losses, run directory (megatron.core)
    nemo_tst.training        adapter to Megatron-LM's trainer (megatron.training)
    nemo_tst.bridge          adapter to Megatron-Bridge (optional; never megatron.training)
    nemo_tst.recipes         recipes as data (nemo_tst.conf), plan, NeMo-Run launching
    nemo_tst.demo, cli       the demo and the `nemo-tst` command
`nemo_tst.cpu` runs Megatron on CPU (tests, CI, the CPU demo) and is opt-in.

The public API below is imported on first use, so `nemo-tst --help` (and anything that only
needs a submodule) does not pay for importing megatron.core.
"""

import importlib

__version__ = "0.1.0"

__all__ = [
    "SuperpositionBatch",
    "SuperpositionConfig",
    "SuperpositionEmbedding",
    "TSTGPTModel",
    "TSTHybridModel",
    "make_superposition_batch",
    "multi_hot_cross_entropy",
    "reduce_multi_hot_loss",
    "set_superposition",
]


def _checkout_conf() -> None:
    """Imported from a source checkout, `nemo_tst.conf` is the checkout's top-level conf/
    (the YAML data and its reader). An install maps that directory to the package name;
    running the checkout with PYTHONPATH=. does not, so the name is bound here."""
    import sys
    from importlib.util import module_from_spec, spec_from_file_location
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    init = root / "conf" / "__init__.py"
    if not (init.is_file() and (root / "pyproject.toml").is_file()):
        return  # an installed package: nemo_tst/conf/ is in it
    spec = spec_from_file_location(f"{__name__}.conf", init, submodule_search_locations=[str(init.parent)])
    module = module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_checkout_conf()


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("nemo_tst.superposition"), name)
    raise AttributeError(f"module 'nemo_tst' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
