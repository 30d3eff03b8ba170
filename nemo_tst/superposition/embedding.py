"""The superposition embedding: one latent position per bag of s tokens.

    e_i = (1/s) * sum_{j<s} E[t_{i*s + j}]        i = 0..L-1,  accumulated in fp32

`SuperpositionEmbedding` is Megatron's `LanguageModelEmbedding` with one attribute more,
`bag_size`, and no parameter more: its state-dict keys and shapes are the vanilla ones, so a
phase-1 checkpoint is a GPT checkpoint. With `bag_size == 1` it runs Megatron's own forward
untouched.

Tensor parallel: each rank looks up its vocabulary shard (ids of other shards give zero rows,
exactly as `VocabParallelEmbedding` does) and averages the bags of its partial rows *before*
the TP reduction. Averaging is linear, so this equals reduce-then-average, but the
all-reduce (or the reduce-scatter under sequence parallel) moves L rows instead of s*L.

The bag mean is the forward of the word-embedding module itself (`BagMeanVocabParallelEmbedding`,
the table's class swapped in place), never a read of its `.weight` from outside: Megatron's DDP
with --overlap-param-gather registers a forward pre-hook on every module that waits for that
module's own parameters' all-gather, and only a call of the module runs it.

After the bag mean everything follows `LanguageModelEmbedding.forward` of megatron-core 0.19:
learned absolute positions (one per latent position), [b, L, h] -> [L, b, h], MuP scaling,
fp32 residual, dropout with the sequence-parallel scatter and RNG fork.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import (
    LanguageModelEmbedding,
)

__all__ = ["BagMeanVocabParallelEmbedding", "SuperpositionEmbedding", "bag_mean_vocab_parallel_lookup"]


def bag_mean_vocab_parallel_lookup(
    word_embeddings: tensor_parallel.VocabParallelEmbedding, input_ids: Tensor, bag_size: int
) -> Tensor:
    """Bag means of a `VocabParallelEmbedding`, averaged before its TP reduction.

    The forward of `BagMeanVocabParallelEmbedding`: call the module, not this function, in a
    model (the module call runs the hooks Megatron's DDP put on the table).

    Args:
        word_embeddings: the (vocab-parallel) embedding table.
        input_ids: [b, L*s] global token ids.
        bag_size: s.

    Returns:
        [b, L, h] (all-reduced over TP), or [L/tp, b, h] when the table reduce-scatters
        into the sequence-parallel region, like `VocabParallelEmbedding.forward`.
    """
    b, n = input_ids.shape
    L = n // bag_size
    tp_group = word_embeddings.tp_group
    tp_size = tp_group.size()
    if getattr(word_embeddings, "gtp_remat_size", 1) > 1:
        raise ValueError("superposition embedding does not support GTP weight rematerialization")

    if tp_size > 1:
        off_shard = (input_ids < word_embeddings.vocab_start_index) | (
            input_ids >= word_embeddings.vocab_end_index
        )
        local_ids = (input_ids - word_embeddings.vocab_start_index).masked_fill(off_shard, 0)
    else:
        local_ids = input_ids
    if word_embeddings.deterministic_mode:
        rows = word_embeddings.weight[local_ids]  # F.embedding's backward is non-deterministic
    else:
        rows = F.embedding(local_ids, word_embeddings.weight)  # [b, L*s, h]
    if tp_size > 1:
        rows = rows.masked_fill(off_shard.unsqueeze(-1), 0.0)

    # [b, L*s, h] -> [b, L, s, h] -> mean over the bag, fp32 accumulation, back to param dtype.
    bags = rows.view(b, L, bag_size, -1).mean(dim=2, dtype=torch.float32).to(rows.dtype)

    if word_embeddings.reduce_scatter_embeddings:
        bags = bags.transpose(0, 1).contiguous()  # [b, L, h] -> [L, b, h]
        return tensor_parallel.reduce_scatter_to_sequence_parallel_region(bags, group=tp_group)
    if tp_size > 1:
        return tensor_parallel.reduce_from_tensor_model_parallel_region(bags, group=tp_group)
    return bags


class BagMeanVocabParallelEmbedding(tensor_parallel.VocabParallelEmbedding):
    """`VocabParallelEmbedding` whose forward also takes the bag size.

    forward(input_ [b, n]) is `VocabParallelEmbedding.forward`, unchanged;
    forward(input_ [b, L*s], bag_size=s) is `bag_mean_vocab_parallel_lookup`.
    No parameter of its own: `SuperpositionEmbedding` swaps the class of the table it already
    has, so the state-dict keys and the DDP hooks on the module stay those of the table.
    """

    @classmethod
    def from_vocab_parallel(
        cls, table: tensor_parallel.VocabParallelEmbedding
    ) -> "BagMeanVocabParallelEmbedding":
        """Make a built `VocabParallelEmbedding` this class, in place (only the class changes)."""
        if type(table) is cls:
            return table
        if type(table) is not tensor_parallel.VocabParallelEmbedding:
            raise TypeError(
                f"cannot add superposition to a {type(table).__name__} word embedding: only "
                "megatron-core's VocabParallelEmbedding is supported"
            )
        table.__class__ = cls
        return table

    def forward(self, input_: Tensor, bag_size: int = 1) -> Tensor:
        if bag_size == 1:
            return super().forward(input_)
        return bag_mean_vocab_parallel_lookup(self, input_, bag_size)


class SuperpositionEmbedding(LanguageModelEmbedding):
    """`LanguageModelEmbedding` that averages bags of `bag_size` tokens into latent positions.

    Same constructor as `LanguageModelEmbedding` plus `bag_size`. `to_superposition` turns an
    already built `LanguageModelEmbedding` (e.g. the one `GPTModel` made) into this class in
    place, keeping its parameters.

    forward(input_ids [b, L*s], position_ids [b, L] or None) -> [L, b, h]
    ([L/tp, b, h] under sequence parallel).
    """

    bag_size: int = 1

    def __init__(self, *args, bag_size: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        BagMeanVocabParallelEmbedding.from_vocab_parallel(self.word_embeddings)
        self.bag_size = bag_size

    @classmethod
    def to_superposition(cls, embedding: LanguageModelEmbedding) -> "SuperpositionEmbedding":
        """Make a built `LanguageModelEmbedding` a `SuperpositionEmbedding`, in place.

        Only the classes change (the move `torch.distributed.fsdp.fully_shard` makes), of the
        embedding and of its word-embedding table: no parameter is allocated, initialised or
        renamed, so the model stays bit-identical to the vanilla one built from the same seed.
        `bag_size` starts at 1 (vanilla behaviour).
        """
        if type(embedding) is cls:
            return embedding
        if type(embedding) is not LanguageModelEmbedding:
            raise TypeError(
                f"cannot add superposition to {type(embedding).__name__}: only megatron-core's "
                "LanguageModelEmbedding is supported"
            )
        BagMeanVocabParallelEmbedding.from_vocab_parallel(embedding.word_embeddings)
        embedding.__class__ = cls
        embedding.bag_size = 1
        return embedding

    def forward(
        self, input_ids: Tensor, position_ids: Optional[Tensor], tokentype_ids: int = None
    ) -> Tensor:
        s = self.bag_size
        if s == 1:
            return super().forward(input_ids, position_ids, tokentype_ids)
        if tokentype_ids is not None:
            raise ValueError("token-type embeddings are not supported with superposition")
        if input_ids.dim() != 2 or input_ids.size(1) % s:
            raise ValueError(
                f"superposition embedding: input_ids {tuple(input_ids.shape)} must be "
                f"[batch, L*{s}] (bag_size={s}); the phase-1 dataset must yield a multiple "
                f"of {s} input tokens per sample"
            )
        L = input_ids.size(1) // s
        if self.config.sequence_parallel and L % self.tp_group.size():
            raise ValueError(
                f"sequence parallel splits the {L} latent positions over tp="
                f"{self.tp_group.size()} ranks: choose --seq-length divisible by the "
                "tensor-parallel size"
            )

        embeddings = self.word_embeddings(input_ids, bag_size=s)
        if self.add_position_embedding:
            if position_ids is None or position_ids.shape != (input_ids.size(0), L):
                raise ValueError(
                    f"learned absolute positions need position_ids [batch, L] = "
                    f"{(input_ids.size(0), L)} (one per latent position), got "
                    f"{None if position_ids is None else tuple(position_ids.shape)}"
                )
            embeddings = embeddings + self.position_embeddings(position_ids)

        if not self.reduce_scatter_embeddings:
            embeddings = embeddings.transpose(0, 1).contiguous()  # [b, L, h] -> [L, b, h]

        if self.config.use_mup and self.config.mup_embedding_mult != 1.0:
            embeddings = embeddings * self.config.mup_embedding_mult
        if self.config.fp32_residual_connection:
            embeddings = embeddings.float()

        if self.config.sequence_parallel:
            if not self.reduce_scatter_embeddings and self.scatter_to_sequence_parallel:
                embeddings = tensor_parallel.scatter_to_sequence_parallel_region(
                    embeddings, group=self.tp_group
                )
            if self.config.clone_scatter_output_in_embedding and self.scatter_to_sequence_parallel:
                embeddings = embeddings.clone()  # let the unscattered tensor be freed
            with tensor_parallel.get_cuda_rng_tracker().fork():
                embeddings = self.embedding_dropout(embeddings)
        else:
            embeddings = self.embedding_dropout(embeddings)
        return embeddings
