"""A TST run's model as a Hugging Face `transformers` checkpoint (`nemo-tst export-hf`).

TST's final model is an ordinary Megatron GPT, so exporting it is a renaming and splitting of
weights; no TST code is involved. What the export does:

    phase 2's checkpoint of N       ->  OUT/config.json               LlamaForCausalLM (dense)
    (torch_dist, `RunDirectory`)        OUT/model.safetensors         or Qwen3MoeForCausalLM (MoE)
                                        OUT/generation_config.json    (sharded + index when large)
    the run's tokenizer.json        ->  OUT/tokenizer.json, tokenizer_config.json,
                                        special_tokens_map.json

The model settings come from the checkpoint itself (Megatron pickles its argument namespace
into every checkpoint's common state), the weights from megatron-core's dist-checkpointing as
whole tensors (`checkpoint.py`), so TP and PP layouts export alike.

Mapping, per layer i (Megatron key under `decoder.layers.{i}.` -> HF key under
`model.layers.{i}.`), with h = hidden size, d = head dim (kv_channels), np = attention heads,
ng = query groups (key/value heads), f = ffn hidden size:

    self_attention.linear_qkv.layer_norm_weight | input_layernorm.weight -> input_layernorm.weight
    self_attention.linear_qkv.weight [ng*(np/ng+2)*d, h]: per query group g, the np/ng query
        heads of the group, then its key head, then its value head, stacked along the output
        dim (megatron.core SelfAttention.get_query_key_value_tensors); viewed as
        [ng, np/ng+2, d, h] -> self_attn.q_proj.weight = [:, :np/ng] as [np*d, h] (query head
        j belongs to group j // (np/ng), which is HF's repeat_kv order),
        self_attn.k_proj.weight = [:, np/ng], self_attn.v_proj.weight = [:, np/ng+1] as [ng*d, h]
    self_attention.linear_proj.weight [h, np*d]                   -> self_attn.o_proj.weight
    self_attention.{q,k}_layernorm.weight [d] (QK-norm, MoE only)  -> self_attn.{q,k}_norm.weight
    mlp.linear_fc1.layer_norm_weight | pre_mlp_layernorm.weight   -> post_attention_layernorm.weight
    mlp.linear_fc1.weight [2f, h] = [gate; up] (megatron.core MLP's glu: silu(first half) *
        second half)                                               -> mlp.gate_proj / mlp.up_proj
    mlp.linear_fc2.weight [h, f]                                   -> mlp.down_proj.weight
  MoE layers (Qwen3-MoE), E experts of hidden size f_e:
    mlp.router.weight [E, h]                                       -> mlp.gate.weight
    mlp.experts.experts.linear_fc1.weight [E, 2f_e, h] = per expert [gate; up]
                                        -> mlp.experts.{e}.gate_proj.weight / up_proj.weight
    mlp.experts.experts.linear_fc2.weight [E, h, f_e]           -> mlp.experts.{e}.down_proj.weight
  and once:
    embedding.word_embeddings.weight [P, h] -> model.embed_tokens.weight [V, h]
    decoder.final_layernorm.weight          -> model.norm.weight
    output_layer.weight [P, h]              -> lm_head.weight [V, h]  (absent when tied:
                                               tie_word_embeddings = true)

Vocabulary: Megatron pads the vocabulary to a multiple of --make-vocab-size-divisible-by x TP
(P rows); rows from the tokenizer's size V on are padding that no token id reaches, so they
are dropped and config.json gets `vocab_size` = V, the tokenizer's size (the logits of every
real token are unchanged; the dropped rows only ever scored ids that do not exist).

Settings: RMSNorm eps (--norm-epsilon) -> rms_norm_eps; --rotary-base -> rope_theta;
--use-rope-scaling (Llama-3 style, factor --rope-scaling-factor, Megatron's fixed low/high
frequency factors 1 and 4 and original context 8192) -> rope type "llama3"; heads, query
groups, head dim, sizes as they are. Every tensor of the model in the checkpoint is used
exactly once: a leftover or a missing one is an error naming it, and so is a setting the HF
architecture cannot express (`unsupported_settings`), checked before anything is written.

Tokenizer: `tokenizer.json` is the run's own (--tst-tokenizer); its end-of-document token is
the EOS and BOS token (Megatron's data has no separate BOS: documents follow an EOD), its pad
token the pad token. HF's fast tokenizer reads special-token text in a string as the special
token, where nemo-tst preprocess encoded such text as bytes; ordinary text encodes the same.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from nemo_tst.core.run_dir import RunDirectory
from nemo_tst.errors import MissingExtra
from nemo_tst.export.checkpoint import choose_checkpoint, read_checkpoint, unstack_layers

__all__ = ["DTYPES", "export_hf", "unsupported_settings"]

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
"""--dtype choices -> the torch dtype name written into config.json."""

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
"""Above this many bytes model.safetensors is split into shards with an index, as
`save_pretrained` does."""

# Megatron's Llama-3 RoPE scaling constants (RotaryEmbedding._apply_scaling's defaults; only
# the factor is an argument).
LLAMA3_LOW_FREQ_FACTOR, LLAMA3_HIGH_FREQ_FACTOR, LLAMA3_ORIGINAL_CONTEXT = 1.0, 4.0, 8192

# Files an export writes (shards match model-*-of-*.safetensors); --overwrite replaces these.
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors",
                "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json")

LLAMA, QWEN3_MOE = "LlamaForCausalLM", "Qwen3MoeForCausalLM"


# ----- settings the HF architectures cannot express --------------------------------------------

@dataclass(frozen=True)
class Refusal:
    """A Megatron setting whose value has no equivalent in the target architecture."""

    attr: str
    """Name in Megatron's argument namespace."""
    flag: str
    """The command-line flag, for the message."""
    supported: Callable[[Any], bool]
    """True for the values the HF architecture expresses (None: the attribute is absent)."""
    why: str


def _off(value) -> bool:
    return not value


def _unset(value) -> bool:
    return value is None


COMMON_REFUSALS = (
    Refusal("position_embedding_type", "--position-embedding-type", lambda v: v == "rope",
            "the HF model has rotary positions only (no learned absolute table, no NoPE)"),
    Refusal("rotary_percent", "--rotary-percent", lambda v: v in (None, 1.0),
            "the HF model rotates every head dimension"),
    Refusal("rotary_interleaved", "--rotary-interleaved", _off,
            "the HF model rotates the two halves of a head, not interleaved pairs"),
    Refusal("rotary_seq_len_interpolation_factor", "--rotary-seq-len-interpolation-factor",
            lambda v: v in (None, 1, 1.0), "linear position interpolation is not mapped"),
    Refusal("no_rope_freq", "--no-rope-freq", _unset, "the HF model uses RoPE in every layer"),
    Refusal("rope_type", "--rope-type", lambda v: v in (None, "rope"),
            "only plain RoPE (optionally Llama-3 scaled) is mapped"),
    Refusal("normalization", "--normalization", lambda v: v == "RMSNorm",
            "the HF model uses RMSNorm"),
    Refusal("layernorm_zero_centered_gamma", "--apply-layernorm-1p", _off,
            "the HF RMSNorm scales by w, not 1 + w"),
    Refusal("apply_residual_connection_post_layernorm",
            "--apply-residual-connection-post-layernorm", _off,
            "the HF model adds the residual before the norm"),
    Refusal("swiglu", "--swiglu (absent)", bool, "the HF MLP is SwiGLU: pass --swiglu"),
    Refusal("squared_relu", "--squared-relu", _off, "the HF MLP is SwiGLU"),
    Refusal("quick_geglu", "--quick-geglu", _off, "the HF MLP is SwiGLU"),
    Refusal("openai_gelu", "--openai-gelu", _off, "the HF MLP is SwiGLU"),
    Refusal("activation_func_clamp_value", "--activation-func-clamp-value", _unset,
            "the HF SwiGLU does not clamp"),
    Refusal("glu_linear_offset", "--glu-linear-offset", lambda v: not v,
            "the HF SwiGLU has no offset on its linear half"),
    Refusal("add_bias_linear", "--add-bias-linear", _off,
            "biases where the HF model has none (train with --disable-bias-linear)"),
    Refusal("add_qkv_bias", "--add-qkv-bias", _off, "a QKV bias where the HF model has none"),
    Refusal("qk_l2_norm", "--qk-l2-norm", _off, "the HF model has no L2 QK-norm"),
    Refusal("attention_output_gate", "--attention-output-gate", _off,
            "the HF attention has no output gate"),
    Refusal("softmax_type", "--softmax-type", lambda v: v in (None, "vanilla"),
            "the HF attention has no attention sinks / off-by-one softmax"),
    Refusal("window_size", "--window-size", _unset, "the HF model attends to the full context"),
    Refusal("multi_latent_attention", "--multi-latent-attention", _off,
            "multi-latent attention is not this architecture"),
    Refusal("experimental_attention_variant", "--experimental-attention-variant", _unset,
            "the HF model has ordinary softmax attention"),
    Refusal("linear_attention_freq", "--linear-attention-freq", _unset,
            "the HF model has no linear-attention layers"),
    Refusal("heterogeneous_layers_config_path", "--heterogeneous-layers-config-path", _unset,
            "the HF model's layers are all alike"),
    Refusal("heterogeneous_layers_config_encoded_json",
            "--heterogeneous-layers-config-encoded-json", _unset,
            "the HF model's layers are all alike"),
    Refusal("is_hybrid_model", "--is-hybrid-model", _off, "Mamba/hybrid layers are not mapped"),
    Refusal("hybrid_layer_pattern", "--hybrid-layer-pattern", _unset,
            "Mamba/hybrid layers are not mapped"),
    Refusal("hybrid_override_pattern", "--hybrid-override-pattern", _unset,
            "Mamba/hybrid layers are not mapped"),
    Refusal("mtp_num_layers", "--mtp-num-layers", lambda v: not v,
            "the HF model has no multi-token-prediction heads"),
    Refusal("use_mup", "--use-mup", _off, "muP multipliers are not mapped"),
)

LLAMA_REFUSALS = COMMON_REFUSALS + (
    Refusal("qk_layernorm", "--qk-layernorm", _off,
            "LlamaForCausalLM has no QK-norm (Qwen3-MoE, the MoE target, has one)"),
)

QWEN3_MOE_REFUSALS = COMMON_REFUSALS + (
    Refusal("qk_layernorm", "--qk-layernorm (absent)", bool,
            "Qwen3MoeForCausalLM always normalises q and k: train with --qk-layernorm"),
    Refusal("moe_layer_freq", "--moe-layer-freq", lambda v: v in (None, 1) or (
        isinstance(v, list) and all(x == 1 for x in v)),
            "every layer must be MoE (dense layers between them are not mapped)"),
    Refusal("moe_shared_expert_intermediate_size", "--moe-shared-expert-intermediate-size",
            _unset, "Qwen3-MoE has no shared expert"),
    Refusal("moe_router_score_function", "--moe-router-score-function",
            lambda v: v in (None, "softmax"), "Qwen3-MoE's router is a softmax"),
    Refusal("moe_router_topk_scaling_factor", "--moe-router-topk-scaling-factor",
            lambda v: v in (None, 1.0), "Qwen3-MoE does not scale the routing weights"),
    Refusal("moe_router_enable_expert_bias", "--moe-router-enable-expert-bias", _off,
            "Qwen3-MoE's router has no expert bias"),
    Refusal("moe_router_num_groups", "--moe-router-num-groups", _unset,
            "Qwen3-MoE routes without expert groups"),
    Refusal("moe_expert_capacity_factor", "--moe-expert-capacity-factor", _unset,
            "Qwen3-MoE drops no tokens"),
    Refusal("moe_apply_probs_on_input", "--moe-apply-probs-on-input", _off,
            "Qwen3-MoE weights the experts' outputs, not their inputs"),
    Refusal("moe_latent_size", "--moe-latent-size", _unset, "Qwen3-MoE has no latent MoE"),
    Refusal("moe_router_force_load_balancing", "--moe-router-force-load-balancing", _off,
            "forced (benchmark) routing is not a trained router"),
)


def _target(args) -> str:
    return QWEN3_MOE if getattr(args, "num_experts", None) else LLAMA


def unsupported_settings(args) -> list[str]:
    """'<flag> <value> (<why>)' for each setting of the run the HF target cannot express."""
    rules = QWEN3_MOE_REFUSALS if _target(args) == QWEN3_MOE else LLAMA_REFUSALS
    problems = []
    for rule in rules:
        value = getattr(args, rule.attr, None)
        if not rule.supported(value):
            shown = "" if isinstance(value, bool) else f" {value}"
            problems.append(f"{rule.flag}{shown} ({rule.why})")
    return problems


# ----- the tensors ------------------------------------------------------------------------------

class CheckpointWeights:
    """The checkpoint's model tensors (per-layer keys), each to be used exactly once."""

    def __init__(self, tensors: dict, where: Path):
        self._left = dict(tensors)
        self._missing: list[str] = []
        self._where = where

    def take(self, *names: str, shape: Optional[tuple] = None):
        """The tensor under the first of `names` present (Megatron's local and Transformer
        Engine layer specs name the fused norms differently), checked against `shape`."""
        for name in names:
            if name in self._left:
                tensor = self._left.pop(name)
                if shape is not None and tuple(tensor.shape) != tuple(shape):
                    raise ValueError(
                        f"{self._where}: {name} has shape {tuple(tensor.shape)}, but the "
                        f"checkpoint's arguments imply {tuple(shape)}; the checkpoint and its "
                        "saved arguments disagree"
                    )
                return tensor
        self._missing.append(" or ".join(names))
        return None

    def finish(self) -> None:
        """Refuse a checkpoint with a tensor not taken, or one that was missing."""
        if self._missing:
            raise ValueError(f"{self._where} lacks {len(self._missing)} weight(s) the model "
                             f"needs: {', '.join(self._missing[:6])}"
                             f"{' ...' if len(self._missing) > 6 else ''}")
        if self._left:
            names = sorted(self._left)
            raise ValueError(f"{self._where} holds {len(names)} weight(s) with no place in the "
                             f"HF model: {', '.join(names[:6])}{' ...' if len(names) > 6 else ''}")


@dataclass(frozen=True)
class Shape:
    """The model's sizes, from Megatron's arguments."""

    layers: int
    hidden: int
    heads: int
    groups: int
    head_dim: int
    ffn: int

    @classmethod
    def from_args(cls, args) -> "Shape":
        heads = args.num_attention_heads
        groups = args.num_query_groups if getattr(args, "group_query_attention", False) else heads
        return cls(layers=args.num_layers, hidden=args.hidden_size, heads=heads,
                   groups=groups or heads, head_dim=args.kv_channels or args.hidden_size // heads,
                   ffn=args.ffn_hidden_size)


def _split_qkv(qkv, shape: Shape):
    """Megatron's fused [ng*(np/ng+2)*d, h] QKV -> (q [np*d, h], k [ng*d, h], v [ng*d, h])."""
    per_group = shape.heads // shape.groups
    # [ng, np/ng + 2, d, h]: the np/ng query heads of group g, its key, its value
    grouped = qkv.view(shape.groups, per_group + 2, shape.head_dim, shape.hidden)
    q = grouped[:, :per_group].reshape(shape.heads * shape.head_dim, shape.hidden)
    k = grouped[:, per_group].reshape(shape.groups * shape.head_dim, shape.hidden)
    v = grouped[:, per_group + 1].reshape(shape.groups * shape.head_dim, shape.hidden)
    return q, k, v


def _split_gate_up(fc1, ffn: int):
    """SwiGLU's fused [2f, h] fc1 = [gate; up] -> (gate [f, h], up [f, h])."""
    return fc1[:ffn], fc1[ffn:]


def hf_state_dict(args, tensors: dict, vocab_size: int, where: Path) -> dict:
    """{HF name: tensor} for the whole model; every checkpoint tensor used exactly once."""
    shape = Shape.from_args(args)
    if shape.heads % shape.groups:
        raise ValueError(f"{where}: {shape.heads} attention heads are not a multiple of "
                         f"{shape.groups} query groups")
    weights = CheckpointWeights(unstack_layers(tensors, shape.layers), where)
    h, d = shape.hidden, shape.head_dim
    moe = _target(args) == QWEN3_MOE
    out = {}

    embedding = weights.take("embedding.word_embeddings.weight")
    if embedding is not None:
        if embedding.shape[0] < vocab_size or embedding.shape[1] != h:
            raise ValueError(
                f"{where}: the embedding has shape {tuple(embedding.shape)}, too small for the "
                f"tokenizer's {vocab_size} tokens x hidden {h}; pass the run's own tokenizer"
            )
        out["model.embed_tokens.weight"] = embedding[:vocab_size]

    for i in range(shape.layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = weights.take(
            src + "self_attention.linear_qkv.layer_norm_weight", src + "input_layernorm.weight",
            shape=(h,))
        qkv = weights.take(src + "self_attention.linear_qkv.weight",
                           shape=((shape.heads + 2 * shape.groups) * d, h))
        if qkv is not None:
            (out[dst + "self_attn.q_proj.weight"], out[dst + "self_attn.k_proj.weight"],
             out[dst + "self_attn.v_proj.weight"]) = _split_qkv(qkv, shape)
        out[dst + "self_attn.o_proj.weight"] = weights.take(
            src + "self_attention.linear_proj.weight", shape=(h, shape.heads * d))
        if moe:  # Qwen3-MoE: RMSNorm over each head's d dims of q and k, before RoPE
            out[dst + "self_attn.q_norm.weight"] = weights.take(
                src + "self_attention.q_layernorm.weight", shape=(d,))
            out[dst + "self_attn.k_norm.weight"] = weights.take(
                src + "self_attention.k_layernorm.weight", shape=(d,))
        out[dst + "post_attention_layernorm.weight"] = weights.take(
            src + "mlp.linear_fc1.layer_norm_weight", src + "pre_mlp_layernorm.weight", shape=(h,))
        if moe:
            out.update(_moe_weights(weights, args, src, dst, h))
        else:
            fc1 = weights.take(src + "mlp.linear_fc1.weight", shape=(2 * shape.ffn, h))
            if fc1 is not None:
                out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = _split_gate_up(fc1, shape.ffn)
            out[dst + "mlp.down_proj.weight"] = weights.take(src + "mlp.linear_fc2.weight",
                                                             shape=(h, shape.ffn))

    out["model.norm.weight"] = weights.take("decoder.final_layernorm.weight", shape=(h,))
    if getattr(args, "untie_embeddings_and_output_weights", False):
        head = weights.take("output_layer.weight")
        if head is not None and embedding is not None:
            if tuple(head.shape) != tuple(embedding.shape):
                raise ValueError(f"{where}: output_layer.weight has shape {tuple(head.shape)}, "
                                 f"the embedding {tuple(embedding.shape)}")
            out["lm_head.weight"] = head[:vocab_size]
    # Tied: HF's lm_head is the embedding (tie_word_embeddings); a saved output_layer.weight
    # would be a weight the run's settings give no place, and finish() names it.
    weights.finish()
    return out


def _moe_weights(weights: CheckpointWeights, args, src: str, dst: str, h: int) -> dict:
    experts, ffn = args.num_experts, args.moe_ffn_hidden_size or args.ffn_hidden_size
    out = {dst + "mlp.gate.weight": weights.take(src + "mlp.router.weight", shape=(experts, h))}
    fc1 = weights.take(src + "mlp.experts.experts.linear_fc1.weight", shape=(experts, 2 * ffn, h))
    fc2 = weights.take(src + "mlp.experts.experts.linear_fc2.weight", shape=(experts, h, ffn))
    for e in range(experts):
        expert = f"{dst}mlp.experts.{e}."
        if fc1 is not None:
            out[expert + "gate_proj.weight"], out[expert + "up_proj.weight"] = _split_gate_up(fc1[e], ffn)
        if fc2 is not None:
            out[expert + "down_proj.weight"] = fc2[e]
    return out


# ----- config files -----------------------------------------------------------------------------

def _rope(args) -> tuple[float, Optional[dict]]:
    """(rope_theta, rope_scaling or None) in HF's terms.

    --use-rope-scaling means what Megatron-LM's GPT builders make of it: GPTModel(rope_scaling=
    args.use_rope_scaling, rope_scaling_factor=args.rope_scaling_factor). A model provider that
    does not pass them trains unscaled RoPE whatever the flag says."""
    theta = float(args.rotary_base)
    if not getattr(args, "use_rope_scaling", False):
        return theta, None
    return theta, {
        "rope_type": "llama3",
        "factor": float(args.rope_scaling_factor),
        "low_freq_factor": LLAMA3_LOW_FREQ_FACTOR,
        "high_freq_factor": LLAMA3_HIGH_FREQ_FACTOR,
        "original_max_position_embeddings": LLAMA3_ORIGINAL_CONTEXT,
    }


def hf_config(args, *, vocab_size: int, eod_id: int, pad_id: Optional[int], dtype: str) -> dict:
    """config.json for the target architecture.

    RoPE is written both ways: `rope_theta`/`rope_scaling` (what transformers 4.x and vLLM
    read) and `rope_parameters` (transformers 5), with the same values."""
    shape = Shape.from_args(args)
    theta, scaling = _rope(args)
    architecture = _target(args)
    config = {
        "architectures": [architecture],
        "model_type": "qwen3_moe" if architecture == QWEN3_MOE else "llama",
        "vocab_size": vocab_size,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.ffn,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.groups,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_position_embeddings or args.seq_length,
        "rms_norm_eps": float(args.layernorm_epsilon),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta} if scaling is None
        else {**scaling, "rope_theta": theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": float(args.init_method_std),
        "tie_word_embeddings": not getattr(args, "untie_embeddings_and_output_weights", False),
        "bos_token_id": eod_id,
        "eos_token_id": eod_id,
        "pad_token_id": pad_id,
        "use_cache": True,
        "torch_dtype": DTYPES[dtype],
        "dtype": DTYPES[dtype],
    }
    if architecture == LLAMA:
        config.update(mlp_bias=False, pretraining_tp=1)
    else:
        config.update(
            num_experts=args.num_experts,
            num_experts_per_tok=args.moe_router_topk,
            moe_intermediate_size=args.moe_ffn_hidden_size or args.ffn_hidden_size,
            # Megatron's default router takes the top-k logits, then a softmax over those k:
            # = HF's softmax over all, top-k, renormalised. --moe-router-pre-softmax: not renormalised.
            norm_topk_prob=not getattr(args, "moe_router_pre_softmax", False),
            decoder_sparse_step=1,
            mlp_only_layers=[],
            router_aux_loss_coef=float(getattr(args, "moe_aux_loss_coeff", 0.0) or 0.0),
            output_router_logits=False,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=shape.layers,
        )
    return config


def _tokenizer_files(tokenizer_path: Path, max_length: int) -> tuple[dict, int, Optional[int], int]:
    """({file name: text} for the tokenizer, its EOD id, its pad id or None, its size)."""
    from nemo_tst.data.tokenizer import NO_PAD_ID, PAD_TOKEN, HFTokenizer

    tokenizer = HFTokenizer.from_file(tokenizer_path)
    pad = None if tokenizer.pad == NO_PAD_ID else tokenizer.pad
    special = {"bos_token": tokenizer.eod_token, "eos_token": tokenizer.eod_token}
    if pad is not None:
        special["pad_token"] = PAD_TOKEN
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": max_length,
        # What the model's forward takes: `model.generate(**tokenizer(text, ...))` works.
        "model_input_names": ["input_ids", "attention_mask"],
        # The data never had a BOS prepended: tokenizing for the model adds nothing.
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    files = {
        "tokenizer.json": tokenizer_path.read_text(),
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2) + "\n",
    }
    return files, tokenizer.eod, pad, tokenizer.vocab_size


def _resolve_tokenizer(args, tokenizer: Optional[os.PathLike], ckpt: Path) -> Path:
    if tokenizer is not None:
        path = Path(tokenizer)
        source = "--tokenizer"
    else:
        recorded = getattr(args, "tst_tokenizer", None)
        if not recorded:
            raise ValueError(f"{ckpt} records no --tst-tokenizer; pass the tokenizer.json the "
                             "run was trained with as --tokenizer PATH")
        path, source = Path(recorded), "the run's --tst-tokenizer"
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{source} {path} does not exist; pass the tokenizer.json the run was "
                         "trained with as --tokenizer PATH")
    return path


# ----- writing ----------------------------------------------------------------------------------

def _check_out(out: Path, overwrite: bool, run_dir: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"OUT {out} is a file; choose a directory")
    if RunDirectory(run_dir).holds_checkpoints_at(out):
        raise ValueError(f"OUT {out} is inside the run's checkpoints; choose another directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"OUT {out} is not empty; choose a new directory, or pass --overwrite "
                         "to replace the export files there")


def _safetensors_files(tensors: dict, max_shard_bytes: int) -> dict[str, Callable[[Path], None]]:
    """{file name: writer} for the weights: model.safetensors, or shards and their index."""
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    shards.append(current)

    def writer(shard):
        return lambda path: save_file(shard, str(path), metadata={"format": "pt"})

    if len(shards) == 1:
        return {"model.safetensors": writer(shards[0])}
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
        "weight_map": {name: file for file, shard in zip(names, shards) for name in shard},
    }
    files = {file: writer(shard) for file, shard in zip(names, shards)}
    files["model.safetensors.index.json"] = lambda path: path.write_text(json.dumps(index, indent=2) + "\n")
    return files


def _write(out: Path, files: dict) -> None:
    """Write every file into a staging directory next to OUT, then move them in: a failure
    while writing leaves OUT as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        for name, content in files.items():
            if callable(content):
                content(staging / name)
            else:
                (staging / name).write_text(content)
        if not out.exists():
            staging.rename(out)
            return
        for old in out.iterdir():  # a previous export's files (--overwrite), stale shards too
            if old.name in EXPORT_FILES or (old.name.startswith("model-") and old.name.endswith(".safetensors")):
                old.unlink()
        for new in staging.iterdir():
            os.replace(new, out / new.name)
        staging.rmdir()
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def export_hf(run_dir, out, *, iteration: Optional[int] = None, dtype: str = "fp32",
              allow_phase1: bool = False, overwrite: bool = False,
              tokenizer: Optional[os.PathLike] = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Export a TST run's checkpoint as a Hugging Face checkpoint in OUT; returns OUT.

    Args:
        run_dir: the run's --save directory (`RunDirectory`).
        out: the directory to write; it must be absent or empty unless `overwrite`.
        iteration: the checkpoint to export; default: phase 2's final one.
        dtype: "fp32" or "bf16", the dtype of the written weights.
        allow_phase1: accept a phase-1 checkpoint for `iteration`.
        overwrite: replace a previous export in OUT.
        tokenizer: the tokenizer.json to ship; default: the run's --tst-tokenizer.
        max_shard_bytes: split model.safetensors into shards of at most this size.

    Raises ValueError, naming the path or setting and the fix, for bad input; nothing is
    written then.
    """
    import importlib.util

    import torch

    if importlib.util.find_spec("safetensors") is None:
        raise MissingExtra("export-hf writes safetensors: pip install 'nemo-tst[hf]' "
                            "(safetensors, transformers)")
    run_dir, out = Path(run_dir), Path(out)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    _check_out(out, overwrite, run_dir)
    choice = choose_checkpoint(run_dir, iteration, allow_phase1)
    args, tensors = read_checkpoint(choice.path)
    problems = unsupported_settings(args)
    if problems:
        raise ValueError(f"{choice.path} cannot be exported as {_target(args)}: "
                         f"{'; '.join(problems)}")
    tokenizer_path = _resolve_tokenizer(args, tokenizer, choice.path)
    max_length = args.max_position_embeddings or args.seq_length
    files, eod_id, pad_id, vocab_size = _tokenizer_files(tokenizer_path, max_length)
    weights = hf_state_dict(args, tensors, vocab_size, choice.path)
    torch_dtype = getattr(torch, DTYPES[dtype])
    # A copy per tensor: q/k/v and gate/up are views of one fused tensor, and safetensors
    # refuses tensors that share memory.
    weights = {name: t.to(dtype=torch_dtype, copy=True).contiguous() for name, t in weights.items()}
    config = hf_config(args, vocab_size=vocab_size, eod_id=eod_id, pad_id=pad_id, dtype=dtype)
    generation = {"bos_token_id": eod_id, "eos_token_id": eod_id, "pad_token_id": pad_id}
    files["config.json"] = json.dumps(config, indent=2) + "\n"
    files["generation_config.json"] = json.dumps(generation, indent=2) + "\n"
    files.update(_safetensors_files(weights, max_shard_bytes))
    _write(out, files)
    return out
