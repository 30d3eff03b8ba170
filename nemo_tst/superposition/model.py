"""GPT / MoE / Hybrid models that switch between phase 1 (superposition) and phase 2 (vanilla).

`TSTGPTModel` and `TSTHybridModel` are megatron-core's `GPTModel` and `HybridModel`, built from
the same config, spec and arguments, with two things added and no parameter:

- the first pipeline stage's `LanguageModelEmbedding` becomes a `SuperpositionEmbedding`
  (same parameters, same state-dict keys);
- `compute_language_model_loss`, the hook both models call with (labels, logits) on the last
  stage, returns the per-target multi-hot CE [b, L, k] when the labels are next-bag targets
  [b, L, k].

`model.set_superposition(SuperpositionConfig(...))` enters phase 1; `set_superposition(None)`
returns to phase 2, where every forward is Megatron's own. The phase is model state, not data:
the trainer sets it on every model chunk before a phase starts.

Phase-1 forward contract (the trainer's forward_step builds it with `make_superposition_batch`):

    model(input_ids [b, L*s_in], position_ids [b, L], attention_mask, labels=targets [b, L, k])
      -> per-target CE [b, L, k] fp32 on the last stage, hidden states elsewhere

The transformer runs on L positions (RoPE positions 0..L-1, taken from the embedded length),
so pipeline send/recv shapes are those of sequence length L. Multi-token prediction re-embeds
shifted ids through the embedding and is refused in phase 1.

A `TSTHybridModel` needs a `HybridStack` spec. Megatron's own (`hybrid_layer_specs.
hybrid_stack_spec`) is built of Transformer Engine layers; `hybrid_stack_spec_from_gpt_layer`
makes one from any GPT layer spec (local, SDPA or TE) for the layer patterns of a plain
transformer, attention (`*`) and MLP (`-`) layers, e.g. "*-*-" for a two-layer GPT.
"""

from typing import Optional

from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.models.hybrid.hybrid_layer_allocation import Symbols, get_hybrid_layer_counts
from megatron.core.models.hybrid.hybrid_model import HybridModel
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from torch import Tensor

from nemo_tst.superposition.config import SuperpositionConfig
from nemo_tst.superposition.embedding import SuperpositionEmbedding
from nemo_tst.superposition.loss import multi_hot_cross_entropy

__all__ = [
    "SuperpositionModelMixin", "TSTGPTModel", "TSTHybridModel", "as_tst_model", "check_transformer_pattern",
    "hybrid_stack_spec_from_gpt_layer", "set_superposition", "tst_module",
]


class SuperpositionModelMixin:
    """Adds the phase switch to a megatron-core `LanguageModule` subclass."""

    superposition: Optional[SuperpositionConfig] = None

    def _add_superposition(self) -> None:
        if getattr(self, "embedding", None) is not None:
            SuperpositionEmbedding.to_superposition(self.embedding)
        self.superposition = None

    def set_superposition(self, config: Optional[SuperpositionConfig]) -> None:
        """Phase 1 with `config`; phase 2 (vanilla next-token training) with None."""
        if config is not None and config.bag_size > 1 and self.config.mtp_num_layers:
            raise ValueError(
                "multi-token prediction (mtp_num_layers="
                f"{self.config.mtp_num_layers}) re-embeds token ids and cannot run in the "
                "superposition phase; disable MTP for phase 1 (--mtp-num-layers 0) or use s=1"
            )
        self.superposition = config
        if getattr(self, "embedding", None) is not None:
            self.embedding.bag_size = 1 if config is None else config.input_bag_size

    def compute_language_model_loss(self, labels: Tensor, logits: Tensor) -> Tensor:
        """labels [b, L] -> Megatron's CE [b, L]; next-bag targets [b, L, k] -> CE [b, L, k]."""
        if labels.dim() == 2:
            return super().compute_language_model_loss(labels, logits)
        if self.superposition is None:
            raise ValueError(
                f"labels of shape {tuple(labels.shape)} are next-bag targets, but the model is "
                "in phase 2; call set_superposition(config) for phase 1"
            )
        # [b, L, k] -> [L, b, k] to meet the logits' [L, b, V/tp]; back to [b, L, k]. The
        # id-range check (a host sync per micro-batch) is left to the caller: the trainer checks
        # the tokenizer against the vocabulary before training, and out-of-range ids still fail
        # in the gather.
        per_target = multi_hot_cross_entropy(
            logits, labels.transpose(0, 1), tp_group=self.pg_collection.tp, check_targets=False
        )
        return per_target.transpose(0, 1).contiguous()


class TSTGPTModel(SuperpositionModelMixin, GPTModel):
    """megatron-core `GPTModel` (dense or MoE) with the TST phase switch. Same arguments."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._add_superposition()


class TSTHybridModel(SuperpositionModelMixin, HybridModel):
    """megatron-core `HybridModel` (Mamba / attention / MoE) with the TST phase switch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._add_superposition()


TRANSFORMER_LAYER_SYMBOLS = (Symbols.ATTENTION, Symbols.MLP)
"""The hybrid layer types of a plain transformer: what `hybrid_stack_spec_from_gpt_layer` builds."""


def hybrid_stack_spec_from_gpt_layer(layer_spec: ModuleSpec) -> ModuleSpec:
    """A `HybridStack` spec whose attention (`*`) and MLP (`-`) layers are the two halves of the
    GPT `TransformerLayer` spec `layer_spec` (e.g. `get_gpt_layer_local_spec(...)`), so that the
    pattern "*-" * n builds the same layers as an n-layer GPTModel, two hybrid layers per GPT
    layer. Other layer types are left out: check the pattern with `check_transformer_pattern`.

    Each half keeps the part of the GPT layer's checkpoint key map that names its norm: with a
    local spec the norms are saved under the names of the TE layers they are fused into in
    Megatron's `hybrid_stack_spec` (`self_attention.linear_qkv.layer_norm_weight`,
    `mlp.linear_fc1.layer_norm_weight`), as GPT's local spec does."""
    gpt = layer_spec.submodules
    keys_map = gpt.sharded_state_dict_keys_map or {}

    def keys_of(norm: str) -> dict:
        return {k: v for k, v in keys_map.items() if k.startswith(norm)}

    attention_layer = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=gpt.input_layernorm,
            self_attention=gpt.self_attention,
            self_attn_bda=gpt.self_attn_bda,
            sharded_state_dict_keys_map=keys_of("input_layernorm."),
        ),
    )
    mlp_layer = ModuleSpec(
        module=MLPLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=gpt.pre_mlp_layernorm,
            mlp=gpt.mlp,
            mlp_bda=gpt.mlp_bda,
            sharded_state_dict_keys_map=keys_of("pre_mlp_layernorm."),
        ),
    )
    return ModuleSpec(
        module=HybridStack,
        submodules=HybridStackSubmodules(attention_layer=attention_layer, mlp_layer=mlp_layer),
    )


def check_transformer_pattern(pattern: str, builder: str, fix: str = "") -> None:
    """ValueError unless the hybrid layer pattern has only attention (`*`) and MLP (`-`) layers
    and no multi-token-prediction part (`/`); pipeline separators (`|`) are allowed. The message
    names `builder` (what builds only those layers) and ends with `fix`."""
    other = [repr(k) for k, n in sorted(get_hybrid_layer_counts(pattern).items())
             if n and k not in TRANSFORMER_LAYER_SYMBOLS]
    if Symbols.MTP_SEPARATOR in pattern:
        other.append(f"multi-token-prediction ({Symbols.MTP_SEPARATOR!r})")
    if other:
        raise ValueError(
            f"--hybrid-layer-pattern {pattern!r} has {', '.join(other)} layers, but {builder} "
            f"builds only attention ('*') and MLP ('-') layers{fix}"
        )


def as_tst_model(module):
    """Make a built megatron-core `GPTModel` / `HybridModel` the TST class, in place (for
    trainers that build the model themselves, e.g. Megatron-Bridge's model providers).

    Only the classes change, of the model and of its embedding: no parameter is allocated or
    renamed, so phase 1 and phase 2 have the same state dict as the vanilla model."""
    if isinstance(module, SuperpositionModelMixin):
        return module
    target = {GPTModel: TSTGPTModel, HybridModel: TSTHybridModel}.get(type(module))
    if target is None:
        raise TypeError(
            f"the model provider built a {type(module).__name__}; TST supports megatron-core's "
            "GPTModel (dense or MoE) and HybridModel as built, not subclasses or other model types"
        )
    module.__class__ = target
    module._add_superposition()
    return module


def tst_module(model) -> Optional[SuperpositionModelMixin]:
    """The TST model inside DDP / Float16 wrappers, or None for a plain model."""
    inner = model
    while not isinstance(inner, SuperpositionModelMixin) and hasattr(inner, "module"):
        inner = inner.module
    return inner if isinstance(inner, SuperpositionModelMixin) else None


def set_superposition(model, config: Optional[SuperpositionConfig]) -> None:
    """Set the phase on a model, a list of virtual-pipeline chunks, or DDP/Float16 wrappers."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        inner = tst_module(chunk)
        if inner is None:
            raise TypeError(
                f"{type(chunk).__name__} is not a TST model: build it with TSTGPTModel or "
                "TSTHybridModel (nemo_tst.superposition.model)"
            )
        inner.set_superposition(config)
