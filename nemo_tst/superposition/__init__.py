"""The TST math: bags, the superposition embedding, the multi-hot loss, the phase switch.

Imports torch and megatron.core only; knows nothing of trainers or launchers.
"""

from nemo_tst.superposition.bags import (
    SuperpositionBatch,
    make_superposition_batch,
    num_latent_positions,
)
from nemo_tst.superposition.config import SuperpositionConfig
from nemo_tst.superposition.embedding import (
    BagMeanVocabParallelEmbedding,
    SuperpositionEmbedding,
    bag_mean_vocab_parallel_lookup,
)
from nemo_tst.superposition.loss import multi_hot_cross_entropy, reduce_multi_hot_loss
from nemo_tst.superposition.model import (
    SuperpositionModelMixin,
    TSTGPTModel,
    TSTHybridModel,
    as_tst_model,
    set_superposition,
    tst_module,
)

__all__ = [
    "BagMeanVocabParallelEmbedding",
    "SuperpositionBatch",
    "SuperpositionConfig",
    "SuperpositionEmbedding",
    "SuperpositionModelMixin",
    "TSTGPTModel",
    "TSTHybridModel",
    "as_tst_model",
    "bag_mean_vocab_parallel_lookup",
    "make_superposition_batch",
    "multi_hot_cross_entropy",
    "num_latent_positions",
    "reduce_multi_hot_loss",
    "set_superposition",
    "tst_module",
]
