"""Core attention through `torch.nn.functional.scaled_dot_product_attention`, for layers without TE.

Why: without Transformer Engine, Megatron's local GPT spec (`get_gpt_layer_local_spec`) uses
`DotProductAttention`, which materialises the [b, np, sq, sk] score matrix, softmaxes it in
eager PyTorch and multiplies again (0.53x the tokens/s of PyTorch SDPA on an H100). PyTorch's
SDPA picks a fused kernel (flash / memory-efficient / cuDNN on GPU, a flash kernel on CPU) for
the same math. `SDPAttention` is a drop-in `core_attention` with DotProductAttention's
constructor and forward; `get_gpt_layer_sdpa_spec` is the local spec with it swapped in.

The math, per head (the same as DotProductAttention's)::

    out = softmax(Q K^T * scale + M) V
    scale = config.softmax_scale, or 1 / sqrt(kv_channels) when that is None
    M[i, j] = -inf for key j > query i   (mask type causal and attention_mask None)
    M[i, j] = -10000 where attention_mask[..., i, j] is True   (an explicit bool mask, which
              replaces the causal one, as in DotProductAttention)
    M = 0 otherwise

Dropout (config.attention_dropout, training only) is applied to softmax(...) before the
product with V. GQA: each of the ng key/value heads serves np / ng consecutive query heads.

Layouts (np: query heads per TP partition, ng: query groups per partition, hn: head dim,
hp = np * hn: hidden size per partition)::

    query [sq, b, np, hn]   key, value [sk, b, ng, hn]   attention_mask [b or 1, 1, sq, sk] bool
    output [sq, b, hp]

Not supported (ValueError naming the setting): packed sequences (packed_seq_params / THD),
attention_bias, sliding windows (config.window_size), softmax_type other than "vanilla",
context parallelism, qk_clip / log_max_attention_logit, multi-latent attention. SDPAttention
has no parameters or buffers, so checkpoints are interchangeable with the local spec's.

MoE: `get_gpt_decoder_block_sdpa_spec` is `get_gpt_decoder_block_spec(config,
use_transformer_engine=False, ...)` with every layer spec rewritten by `with_sdpa_core_attention`.
"""

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
)
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide

__all__ = [
    "SDPAttention",
    "get_gpt_decoder_block_sdpa_spec",
    "get_gpt_layer_sdpa_spec",
    "with_sdpa_core_attention",
]

# The value Megatron's attention_mask_func writes into masked scores (transformer/utils.py).
_MASKED_SCORE = -10000.0


class SDPAttention(MegatronModule):
    """DotProductAttention's math through `F.scaled_dot_product_attention`.

    Constructor and forward as megatron-core 0.19's `DotProductAttention`; see the module
    docstring for the math, the layouts and what is refused.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        self.config: TransformerConfig = config
        _refuse_unsupported_config(config, layer_number)

        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type  # unused, as in DotProductAttention

        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        elif not hasattr(pg_collection, "tp"):
            raise ValueError("SDPAttention needs a pg_collection with a `tp` process group")
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp

        world_size = pg_collection.tp.size()
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, world_size)
        self.hidden_size_per_attention_head = divide(projection_size, config.num_attention_heads)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, world_size)
        self.num_query_groups_per_partition = divide(config.num_query_groups, world_size)

        # DotProductAttention multiplies Q K^T by scale / layer_number (apply_query_key_layer_
        # scaling, so that fp16 scores do not overflow) and its softmax multiplies the scores by
        # layer_number again, in fp32: the product is `scale`. SDPA kernels accumulate scores
        # in fp32, so they take `scale` in one go.
        if config.apply_query_key_layer_scaling and not config.attention_softmax_in_fp32:
            raise ValueError(
                "apply_query_key_layer_scaling needs attention_softmax_in_fp32=True "
                "(as in DotProductAttention)"
            )
        if softmax_scale is None:
            softmax_scale = 1.0 / math.sqrt(self.hidden_size_per_attention_head)
        self.softmax_scale = softmax_scale
        """The scale SDPA applies to Q K^T (DotProductAttention's softmax_scale * coeff)."""

        # The softmax runs inside the kernel, which accumulates in fp32 for fp16/bf16 inputs
        # whatever attention_softmax_in_fp32 says: with it False this path is more precise
        # than DotProductAttention's half-precision softmax, so not bitwise equal to it.

        # Probability of dropping an attention weight, as DotProductAttention's nn.Dropout.
        self.attention_dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        """query [sq, b, np, hn], key/value [sk, b, ng, hn], mask [b|1, 1, sq, sk] bool
        (True = masked out) or None -> [sq, b, hp].

        attn_mask_type, when given, overrides the constructor's (Attention passes no_mask when
        decoding from a KV cache, as TE expects). DotProductAttention ignores it; the two agree
        on the one-query decode step, where neither masks.
        """
        if packed_seq_params is not None:
            raise ValueError(
                "SDPAttention does not support packed sequences (packed_seq_params / THD); "
                "use the Transformer Engine spec"
            )
        if attention_bias is not None:
            raise ValueError("SDPAttention does not support attention_bias")
        attn_mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        sq, b, sk = query.size(0), query.size(1), key.size(0)

        # GQA: [sk, b, ng, hn] -> [sk, b, np, hn], query heads i*np/ng .. (i+1)*np/ng - 1 share
        # group i, exactly as DotProductAttention. (SDPA's enable_gqa would avoid the copy, but
        # only its flash and math kernels accept it: fp32 inputs or an explicit mask would
        # fall back to the math kernel.)
        heads_per_group = divide(
            self.num_attention_heads_per_partition, self.num_query_groups_per_partition
        )
        if heads_per_group > 1:
            key = key.repeat_interleave(heads_per_group, dim=2)
            value = value.repeat_interleave(heads_per_group, dim=2)

        attn_mask, is_causal = self._sdpa_mask(attention_mask, attn_mask_type, sq, sk, query.dtype)
        dropout_p = self.attention_dropout_p if self.training else 0.0

        # [s, b, n, hn] -> [b, n, s, hn] (views; SDPA takes strided inputs).
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))

        def attend() -> Tensor:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                scale=self.softmax_scale,
            )

        if dropout_p > 0.0 and not self.config.sequence_parallel:
            # Draw the dropout mask from the model-parallel RNG stream, as DotProductAttention
            # does (TP ranks hold different heads; activation recompute restores this stream).
            # The kernel consumes random numbers differently from nn.Dropout, so with
            # attention_dropout > 0 the masks, and outputs, are not bitwise Megatron's.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = attend()
        else:
            context = attend()

        # [b, np, sq, hn] -> [sq, b, np, hn] -> [sq, b, hp]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    @staticmethod
    def _sdpa_mask(
        attention_mask: Optional[Tensor], attn_mask_type: AttnMaskType, sq: int, sk: int, dtype
    ) -> tuple[Optional[Tensor], bool]:
        """(attn_mask, is_causal) for SDPA, with DotProductAttention's precedence: an explicit
        mask wins over the mask type; without one only the causal type masks anything."""
        if attention_mask is not None:
            if attention_mask.dtype != torch.bool:
                raise ValueError(
                    f"SDPAttention takes a bool attention_mask (True = masked out), got "
                    f"{attention_mask.dtype}"
                )
            # Megatron's convention is True = masked out; SDPA's bool masks mean the opposite,
            # so pass an additive mask instead: -10000 (Megatron's fill value) where True. The
            # probabilities equal DotProductAttention's (which overwrites the score with -10000)
            # except in a query row masked entirely, which both keep finite but weight
            # differently (a bool mask would give -inf there: NaN or zeros by kernel).
            additive = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
            return additive.masked_fill_(attention_mask, _MASKED_SCORE), False
        if attn_mask_type != AttnMaskType.causal or sq == 1:
            # sq == 1: one new query against a KV cache sees every key (DotProductAttention too).
            return None, False
        if sq != sk:
            raise ValueError(
                f"SDPAttention: a causal mask without an explicit attention_mask needs sq == sk "
                f"(got sq={sq}, sk={sk}); pass the mask"
            )
        return None, True


def _refuse_unsupported_config(config: TransformerConfig, layer_number: int) -> None:
    """ValueError for what SDPAttention cannot compute, at construction time."""
    if config.context_parallel_size != 1:
        raise ValueError(
            f"SDPAttention does not support context parallelism (context_parallel_size="
            f"{config.context_parallel_size}); use the Transformer Engine spec"
        )
    if config.softmax_type != "vanilla":
        raise ValueError(
            f"SDPAttention supports softmax_type='vanilla' only (got {config.softmax_type!r}); "
            "use DotProductAttention (the local spec) or the Transformer Engine spec"
        )
    if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
        raise ValueError(
            f"SDPAttention does not support sliding-window attention (window_size="
            f"{config.window_size}); use DotProductAttention (the local spec)"
        )
    if config.qk_clip or config.log_max_attention_logit:
        raise ValueError(
            "SDPAttention does not expose attention logits: qk_clip and log_max_attention_logit "
            "must be False"
        )


def with_sdpa_core_attention(layer_spec: ModuleSpec) -> ModuleSpec:
    """A copy of a local-spec TransformerLayer spec whose self-attention uses SDPAttention.

    Everything else (norms, linear layers, MLP or MoE, sharded_state_dict_keys_map) is kept.
    Raises ValueError for a layer whose core attention is not DotProductAttention, or for
    multi-latent attention (its query/key and value head sizes differ).
    """
    attention = layer_spec.submodules.self_attention
    submodules = getattr(attention, "submodules", None)
    if not isinstance(submodules, SelfAttentionSubmodules):
        raise ValueError(
            f"with_sdpa_core_attention rewrites SelfAttention layers only, got "
            f"{getattr(attention, 'module', attention)} (multi-latent attention is not "
            "supported: use the local spec)"
        )
    if submodules.core_attention is not DotProductAttention:
        raise ValueError(
            f"with_sdpa_core_attention expects the local spec's DotProductAttention, got "
            f"{submodules.core_attention}"
        )
    attention = dataclasses.replace(
        attention, submodules=dataclasses.replace(submodules, core_attention=SDPAttention)
    )
    return dataclasses.replace(
        layer_spec,
        submodules=dataclasses.replace(layer_spec.submodules, self_attention=attention),
    )


def get_gpt_layer_sdpa_spec(
    qk_layernorm: bool = False,
    normalization: Optional[str] = None,
    num_experts: Optional[int] = None,
    moe_grouped_gemm: bool = False,
    qk_l2_norm: bool = False,
) -> ModuleSpec:
    """`get_gpt_layer_local_spec(...)` with core_attention=SDPAttention; all else the same."""
    return with_sdpa_core_attention(
        get_gpt_layer_local_spec(
            num_experts=num_experts,
            moe_grouped_gemm=moe_grouped_gemm,
            qk_layernorm=qk_layernorm,
            normalization=normalization,
            qk_l2_norm=qk_l2_norm,
        )
    )


def get_gpt_decoder_block_sdpa_spec(
    config: TransformerConfig,
    normalization: Optional[str] = None,
    qk_l2_norm: bool = False,
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
) -> TransformerBlockSubmodules:
    """`get_gpt_decoder_block_spec(config, use_transformer_engine=False, ...)` (dense and MoE
    layers by config.moe_layer_freq, this pipeline stage's slice) with SDPAttention."""
    block = get_gpt_decoder_block_spec(
        config,
        use_transformer_engine=False,
        normalization=normalization,
        qk_l2_norm=qk_l2_norm,
        vp_stage=vp_stage,
        pp_rank=pp_rank,
    )
    return dataclasses.replace(
        block, layer_specs=[with_sdpa_core_attention(spec) for spec in block.layer_specs]
    )
