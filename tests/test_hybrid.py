"""TSTHybridModel with the attention + MLP layer pattern of a plain transformer ("*-*-"):
phase 1 against bag means through the vanilla model, phase 2 and s = 1 equal to megatron-core's
HybridModel, the same model as a GPTModel of half the layers, TP=2 and PP=2 equal to one rank.

Without Transformer Engine (always so on CPU) HybridStack's final norm is nemo_tst.cpu's
stand-in for TE's TENorm, which is checked here against torch's norms.
"""

import pytest
import torch
import torch.nn.functional as F

from nemo_tst import cpu
from tests.distributed import init_megatron_parallel, run_on_ranks
from tests.test_model import (
    BATCH,
    HIDDEN,
    L,
    VOCAB,
    causal_mask,
    check_phase1_is_bag_means_through_the_vanilla_model,
    check_s1_phase1_equals_the_vanilla_model_bit_for_bit,
    check_tensor_parallel_2_matches_tp1,
    phase1_batch,
    phase1_loss,
)

PATTERN = "*-*-"  # two GPT layers: attention, MLP, attention, MLP


def hybrid_config(tp=1, pp=1, normalization="RMSNorm", eps=1e-5):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=len(PATTERN),
        hidden_size=HIDDEN,
        ffn_hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32,
        normalization=normalization,
        layernorm_epsilon=eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        is_hybrid_model=True,
        **cpu.MODEL_CPU_CONFIG,
    )


def build(cls_name="TSTHybridModel", tp=1, pp=1, seed=1234, normalization="RMSNorm", eps=1e-5):
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    from nemo_tst.superposition.model import TSTHybridModel, hybrid_stack_spec_from_gpt_layer

    torch.manual_seed(seed)
    cls = {"TSTHybridModel": TSTHybridModel, "HybridModel": HybridModel}[cls_name]
    return cls(
        config=hybrid_config(tp, pp, normalization, eps),
        hybrid_stack_spec=hybrid_stack_spec_from_gpt_layer(
            get_gpt_layer_local_spec(normalization=normalization)
        ),
        vocab_size=VOCAB,
        max_sequence_length=64,
        hybrid_layer_pattern=PATTERN,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )


def test_layers_follow_the_pattern_and_the_final_norm_is_torchs(single_rank):
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.transformer_layer import TransformerLayer

    model = build()
    layers = model.decoder.layers
    assert [type(layer) for layer in layers] == [TransformerLayer, MLPLayer] * 2
    assert all(isinstance(layer.mlp, IdentityOp) for layer in layers[::2])
    assert all(isinstance(layer.self_attention, IdentityOp) for layer in layers[1::2])
    assert isinstance(model.decoder.final_norm, torch.nn.RMSNorm)


@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
def test_final_norm_stand_in_is_the_configured_norm_with_its_eps(single_rank, normalization):
    """The TENorm stand-in against torch's functional norms: config.normalization and
    config.layernorm_epsilon are honoured (TENorm's contract)."""
    model = build(normalization=normalization, eps=1e-2)
    norm = model.decoder.final_norm
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        if normalization == "LayerNorm":
            norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(L, BATCH, HIDDEN) * 0.1  # small: eps = 1e-2 matters
    if normalization == "RMSNorm":
        want = F.rms_norm(x, (HIDDEN,), norm.weight, eps=1e-2)
        assert sorted(n for n, _ in norm.named_parameters()) == ["weight"]
    else:
        want = F.layer_norm(x, (HIDDEN,), norm.weight, norm.bias, eps=1e-2)
        assert sorted(n for n, _ in norm.named_parameters()) == ["bias", "weight"]
    torch.testing.assert_close(norm(x), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("s", [2, 4])
def test_phase1_forward_is_bag_means_through_the_vanilla_model(single_rank, s):
    check_phase1_is_bag_means_through_the_vanilla_model(build, s)


def test_s1_phase1_and_phase2_equal_vanilla_hybrid_model_bit_for_bit(single_rank):
    from nemo_tst import set_superposition

    tst, vanilla = build(), build("HybridModel")
    check_s1_phase1_equals_the_vanilla_model_bit_for_bit(tst, vanilla)

    set_superposition(tst, None)
    ids = torch.randint(0, VOCAB, (BATCH, L))
    pos = torch.arange(L).expand(BATCH, L)
    assert torch.equal(tst(ids, pos, causal_mask(L)), vanilla(ids, pos, causal_mask(L)))


def test_phase1_state_dict_loads_into_vanilla_hybrid_model(single_rank):
    tst, vanilla = build(seed=1), build("HybridModel", seed=2)
    cfg, batch = phase1_batch(4)
    phase1_loss(tst, cfg, batch).backward()
    result = vanilla.load_state_dict(tst.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def gpt_key_of(hybrid_key: str) -> str:
    """The GPTModel state-dict key of a "*-"-pattern HybridModel's key: hybrid layers 2i
    (attention) and 2i+1 (MLP) are GPT layer i; the final norm has another name."""
    if hybrid_key.startswith("decoder.layers."):
        index, rest = hybrid_key.removeprefix("decoder.layers.").split(".", 1)
        return f"decoder.layers.{int(index) // 2}.{rest}"
    return hybrid_key.replace("decoder.final_norm.", "decoder.final_layernorm.")


def test_attention_mlp_pattern_is_the_gpt_model_of_half_the_layers(single_rank):
    """With a GPTModel's weights, the "*-*-" TSTHybridModel gives the 2-layer TSTGPTModel's
    phase-1 loss and gradients and its phase-2 logits."""
    from nemo_tst import set_superposition
    from tests.test_model import build as build_gpt

    gpt, hybrid = build_gpt(), build()
    gpt_state = gpt.state_dict()
    mapped = {k: gpt_state[gpt_key_of(k)] for k in hybrid.state_dict()}
    hybrid.load_state_dict(mapped, strict=True)
    assert len(mapped) == len(gpt_state)  # every GPT tensor used exactly once

    cfg, batch = phase1_batch(4)
    gpt_loss, hybrid_loss = phase1_loss(gpt, cfg, batch), phase1_loss(hybrid, cfg, batch)
    torch.testing.assert_close(hybrid_loss, gpt_loss, atol=1e-6, rtol=0)
    gpt_loss.backward()
    hybrid_loss.backward()
    gpt_grads = dict(gpt.named_parameters())
    for name, p in hybrid.named_parameters():
        torch.testing.assert_close(p.grad, gpt_grads[gpt_key_of(name)].grad, atol=1e-6, rtol=1e-5, msg=name)

    set_superposition(gpt, None)
    set_superposition(hybrid, None)
    ids = torch.randint(0, VOCAB, (BATCH, L))
    pos = torch.arange(L).expand(BATCH, L)
    torch.testing.assert_close(hybrid(ids, pos, causal_mask(L)), gpt(ids, pos, causal_mask(L)),
                               atol=1e-6, rtol=0)


def test_patterns_beyond_attention_and_mlp_are_refused():
    from nemo_tst.superposition.model import check_transformer_pattern

    check_transformer_pattern("*-*-|*-*-", "the local spec")
    with pytest.raises(ValueError, match=r"'M\*-' has 'M' layers, but the local spec builds only"):
        check_transformer_pattern("M*-", "the local spec")
    with pytest.raises(ValueError, match=r"has 'E', 'M' layers"):
        check_transformer_pattern("ME*-", "the local spec")
    with pytest.raises(ValueError, match=r"has multi-token-prediction \('/'\) layers"):
        check_transformer_pattern("*-*-/*-", "the local spec")


def test_checkpoints_name_the_norms_as_megatrons_te_hybrid_layers_do(single_rank):
    from megatron.core import parallel_state

    model = build()
    sharded = model.sharded_state_dict(
        metadata={"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    )
    keys = {v.key for v in sharded.values() if hasattr(v, "key")}
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in keys
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in keys
    assert "decoder.final_norm.weight" in keys
    assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in keys)


def test_tensor_parallel_2_matches_tp1(single_rank, tmp_path):
    check_tensor_parallel_2_matches_tp1(build, tmp_path)


def global_key(local_key: str, layer_offset: int) -> str:
    """The PP=1 state-dict key of a pipeline stage's key (its layers are numbered from 0)."""
    if not local_key.startswith("decoder.layers."):
        return local_key
    index, rest = local_key.removeprefix("decoder.layers.").split(".", 1)
    return f"decoder.layers.{int(index) + layer_offset}.{rest}"


def _pp2_worker(rank, world_size, s, pp1_state, out_dir):
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_tst import reduce_multi_hot_loss, set_superposition

    init_megatron_parallel(pp=world_size)
    model = build(pp=world_size)
    offset = model.decoder.layers[0].layer_number - 1
    model.load_state_dict({k: pp1_state[global_key(k, offset)] for k in model.state_dict()}, strict=True)
    cfg, batch = phase1_batch(s)
    set_superposition(model, cfg)

    def forward_step(data_iterator, model):
        per_target = model(batch.input_ids, batch.position_ids, causal_mask(L), labels=batch.targets)

        def loss_func(per_target):
            total, positions = reduce_multi_hot_loss(per_target, batch.target_mask, torch.tensor(cfg.weights()))
            return total / positions, {"loss": (total / positions).detach()}

        return per_target, loss_func

    model.config.finalize_model_grads_func = None
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=None, model=[model], num_microbatches=1,
        seq_length=L, micro_batch_size=BATCH, forward_only=False,
    )
    out = {"grads": {global_key(n, offset): p.grad for n, p in model.named_parameters()}}
    if parallel_state.is_pipeline_last_stage():
        out["loss"] = losses[0]["loss"]
    torch.save(out, f"{out_dir}/rank{rank}.pt")


def test_pipeline_parallel_2_matches_pp1(single_rank, tmp_path):
    """Phase 1 through Megatron's pipeline schedule, the two stages sending [L, b, h]."""
    s = 4
    model = build()
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}
    run_on_ranks(_pp2_worker, 2, s, state, str(tmp_path))
    stages = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    cfg, batch = phase1_batch(s)
    loss = phase1_loss(model, cfg, batch)
    loss.backward()
    torch.testing.assert_close(stages[1]["loss"], loss.detach(), atol=1e-5, rtol=0)
    pp2_grads = {**stages[0]["grads"], **stages[1]["grads"]}
    assert sorted(pp2_grads) == sorted(n for n, _ in model.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(pp2_grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
