"""nemo-tst: Token-Superposition Training for Megatron-Core / NeMo pretraining.

Layers, each knowing only the one below it:
    nemo_tst.superposition   the TST math (torch + megatron.core)
    nemo_tst.training        glue to megatron.training's trainer
    nemo_tst.recipes, cli    NeMo-Run recipes, launchers and the `nemo-tst` command
`nemo_tst.cpu` runs Megatron on CPU (tests, CI, the CPU demo) and is opt-in.
"""

from nemo_tst.superposition import (
    SuperpositionBatch,
    SuperpositionConfig,
    SuperpositionEmbedding,
    TSTGPTModel,
    TSTHybridModel,
    make_superposition_batch,
    multi_hot_cross_entropy,
    reduce_multi_hot_loss,
    set_superposition,
)

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
