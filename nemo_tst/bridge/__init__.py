"""Optional Megatron-Bridge adapter: run TST from a Bridge `ConfigContainer` (a NeMo recipe).

Targets Megatron-Bridge 0.6.x (PyPI `megatron-bridge>=0.6,<0.7`), tested with 0.6.2; another
major/minor version is refused (`require_bridge`). Written against the source of tag v0.6.0,
commit 51885cf132b2814188b6855c25a8588254274c2a, whose pinned megatron-core is 0.19.0, the
megatron-core line nemo_tst uses. Bridge imports Transformer Engine unguarded, so every
`megatron.bridge` import is inside a function: `import nemo_tst.bridge` works anywhere, and the
Bridge-facing calls raise an ImportError that says what to install. See docs/bridge.md.

    checks     require_bridge, the recipe checks, plan_tst_run (the plan from a recipe's numbers)
    provider   TSTDatasetProvider: both phases' data, a Bridge DatasetProvider
    step       tst_forward_step: Bridge's forward step for both phases
    launch     tst_phase_configs (the two phase containers), tst_pretrain (the next phase)
    cli        `python -m nemo_tst.bridge.cli --recipe NAME key.path=value --tst-bag-size S`

    from nemo_tst.bridge import TSTSettings, tst_pretrain
    tst_pretrain(cfg, TSTSettings(bag_size=6, phase1_fraction=0.3))   # run twice: phase 1, 2

The settings, the plan, the data stream, the losses and the run directory are
`nemo_tst.core`'s, shared with the Megatron-LM adapter; this package never imports
`megatron.training`.
"""

from nemo_tst.bridge.checks import (
    BRIDGE_COMMIT,
    BRIDGE_NAMES,
    BRIDGE_REQUIREMENT,
    BRIDGE_TESTED,
    BRIDGE_VERSION,
    check_phase_iteration,
    plan_tst_run,
    require_bridge,
)
from nemo_tst.bridge.launch import next_tst_phase, tst_model_hook, tst_phase_configs, tst_pretrain
from nemo_tst.bridge.step import tst_forward_step
from nemo_tst.core.settings import TSTSettings

__all__ = [
    "BRIDGE_COMMIT", "BRIDGE_NAMES", "BRIDGE_REQUIREMENT", "BRIDGE_TESTED", "BRIDGE_VERSION", "TSTDatasetProvider",
    "TSTSettings", "check_phase_iteration", "next_tst_phase", "plan_tst_run", "require_bridge",
    "tst_forward_step", "tst_model_hook", "tst_phase_configs", "tst_pretrain",
]


def __getattr__(name: str):
    # `nemo_tst.bridge.TSTDatasetProvider` resolves (with Bridge installed) so that the class
    # path Bridge writes into run_config.yaml, and pickling, find it.
    if name == "TSTDatasetProvider":
        from nemo_tst.bridge.provider import dataset_provider_class

        return dataset_provider_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
