"""SDPAttention (torch SDPA) against the local spec's DotProductAttention, on CPU, one rank."""

import pytest
import torch
import torch.nn.functional as F

from nemo_tst import cpu

HIDDEN, HEADS, SEQ, BATCH, VOCAB = 64, 4, 16, 2, 128


def config(groups=2, dtype=torch.float32, **overrides):
    from megatron.core.transformer import TransformerConfig

    kwargs = dict(
        num_layers=2,
        hidden_size=HIDDEN,
        ffn_hidden_size=128,
        num_attention_heads=HEADS,
        num_query_groups=groups,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        **cpu.MODEL_CPU_CONFIG,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def core_attentions(cfg, layer_number=1):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from nemo_tst.attention import SDPAttention

    kwargs = dict(config=cfg, layer_number=layer_number, attn_mask_type=AttnMaskType.causal,
                  attention_type="self", softmax_scale=cfg.softmax_scale)
    return DotProductAttention(**kwargs), SDPAttention(**kwargs)


def qkv(cfg, dtype, seed=0, sk=SEQ):
    """query [sq, b, np, hn], key/value [sk, b, ng, hn], leaves that require grad."""
    g = torch.Generator().manual_seed(seed)
    hn = cfg.kv_channels
    shapes = [(SEQ, BATCH, HEADS, hn), (sk, BATCH, cfg.num_query_groups, hn),
              (sk, BATCH, cfg.num_query_groups, hn)]
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]


def run(module, inputs, mask):
    q, k, v = [t.detach().clone().requires_grad_() for t in inputs]
    out = module(q, k, v, mask)
    # A fixed random cotangent, so every output element shapes the gradients.
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype))
    return out, (q.grad, k.grad, v.grad)


def random_mask():
    """[b, 1, s, s] bool, True = masked out; random, but every query sees itself."""
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(BATCH, 1, SEQ, SEQ, generator=g) < 0.5
    return mask & ~torch.eye(SEQ, dtype=torch.bool)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("groups", [HEADS, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("mask", ["none", "causal", "random"])
def test_matches_dot_product_attention(single_rank, dtype, groups, mask):
    """Outputs and q/k/v gradients; mask "none" takes SDPA's is_causal path, the others the
    explicit-mask path (where DotProductAttention, too, ignores the causal type)."""
    from nemo_tst.cpu import causal_attention_mask

    cfg = config(groups, dtype)
    reference, sdpa = core_attentions(cfg)
    inputs = qkv(cfg, dtype)
    m = {"none": None, "causal": causal_attention_mask(SEQ), "random": random_mask()}[mask]
    want_out, want_grads = run(reference, inputs, m)
    out, grads = run(sdpa, inputs, m)

    assert out.shape == (SEQ, BATCH, HIDDEN) and out.dtype == dtype
    # bf16: DotProductAttention rounds the scores to bf16 before its fp32 softmax, the SDPA
    # kernel keeps them in fp32; each side is a few bf16 ulps from the fp32 result.
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(out, want_out, **tol)
    for name, got, want in zip("qkv", grads, want_grads):
        torch.testing.assert_close(got, want, **tol, msg=lambda text: f"d{name}: {text}")


def test_scale_follows_softmax_scale_and_query_key_layer_scaling(single_rank):
    """DotProductAttention divides the scale by layer_number in the matmul and multiplies it
    back in its fp32 softmax; SDPAttention applies the product once."""
    cfg = config(softmax_scale=0.3, apply_query_key_layer_scaling=True)
    reference, sdpa = core_attentions(cfg, layer_number=3)
    assert sdpa.softmax_scale == pytest.approx(reference.softmax_scale * 3) == 0.3
    inputs = qkv(cfg, torch.float32)
    want_out, want_grads = run(reference, inputs, None)
    out, grads = run(sdpa, inputs, None)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_attention_dropout_applies_in_training_only(single_rank):
    cfg = config(attention_dropout=0.5)
    reference, sdpa = core_attentions(cfg)
    q, k, v = qkv(cfg, torch.float32)
    sdpa.eval()
    reference.eval()
    torch.testing.assert_close(sdpa(q, k, v, None), reference(q, k, v, None), atol=1e-5, rtol=1e-5)
    sdpa.train()
    assert not torch.allclose(sdpa(q, k, v, None), reference(q, k, v, None), atol=1e-3)


def gpt(spec, seed=1234, **overrides):
    from megatron.core.models.gpt import GPTModel

    from nemo_tst.cpu import seed_model_parallel

    seed_model_parallel(seed)
    return GPTModel(config=config(groups=2, **overrides), transformer_layer_spec=spec,
                    vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope",
                    share_embeddings_and_output_weights=False)


def batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    return ids, torch.arange(SEQ).expand(BATCH, SEQ), labels


@pytest.mark.parametrize("explicit_mask", [False, True], ids=["no-mask", "causal-mask"])
def test_gpt_model_logits_and_gradients_match_the_local_spec(single_rank, explicit_mask):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from nemo_tst.attention import SDPAttention, get_gpt_layer_sdpa_spec
    from nemo_tst.cpu import causal_attention_mask

    local = gpt(get_gpt_layer_local_spec(normalization="RMSNorm"))
    sdpa = gpt(get_gpt_layer_sdpa_spec(normalization="RMSNorm"), seed=99)
    sdpa.load_state_dict(local.state_dict(), strict=True)  # no extra parameters or buffers
    assert isinstance(sdpa.decoder.layers[0].self_attention.core_attention, SDPAttention)

    ids, positions, labels = batch()
    mask = causal_attention_mask(SEQ) if explicit_mask else None

    with torch.no_grad():
        torch.testing.assert_close(sdpa(ids, positions, mask), local(ids, positions, mask),
                                   atol=1e-5, rtol=1e-5)
    for model in (local, sdpa):
        model(ids, positions, mask, labels=labels).mean().backward()  # [b, s] CE -> mean
    for (name, p), q in zip(sdpa.named_parameters(), local.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4,
                                   msg=lambda text: f"{name}: {text}")


def test_moe_block_spec_uses_sdpa_in_every_layer(single_rank):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from nemo_tst.attention import SDPAttention, get_gpt_decoder_block_sdpa_spec

    moe = dict(num_moe_experts=4, moe_router_topk=2, moe_token_dispatcher_type="allgather",
               moe_layer_freq=[1, 0])
    cfg = config(**moe)
    block = get_gpt_decoder_block_sdpa_spec(cfg, normalization="RMSNorm")
    assert len(block.layer_specs) == 2
    for spec in block.layer_specs:
        assert spec.submodules.self_attention.submodules.core_attention is SDPAttention
    assert block.layer_specs[0].submodules.mlp != block.layer_specs[1].submodules.mlp  # MoE, dense

    local = gpt(get_gpt_decoder_block_spec(cfg, use_transformer_engine=False,
                                           normalization="RMSNorm"), **moe)
    sdpa = gpt(block, seed=99, **moe)
    sdpa.load_state_dict(local.state_dict(), strict=True)
    ids, positions, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(sdpa(ids, positions, None), local(ids, positions, None),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(softmax_type="off-by-one"), "softmax_type"),
        (dict(window_size=(4, 0)), "window_size"),
        (dict(qk_clip=True), "qk_clip"),
        (dict(apply_query_key_layer_scaling=True, attention_softmax_in_fp32=False),
         "attention_softmax_in_fp32"),
    ],
)
def test_unsupported_config_is_refused_at_construction(single_rank, overrides, match):
    from megatron.core.transformer.enums import AttnMaskType

    from nemo_tst.attention import SDPAttention

    cfg = config()
    for name, value in overrides.items():  # after __post_init__, which would rewrite some
        setattr(cfg, name, value)
    with pytest.raises(ValueError, match=match):
        SDPAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")


def test_context_parallelism_is_refused(single_rank):
    from megatron.core.transformer.enums import AttnMaskType

    from nemo_tst.attention import SDPAttention

    cfg = config()
    cfg.context_parallel_size = 2
    with pytest.raises(ValueError, match="context_parallel_size"):
        SDPAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")


def test_unsupported_forward_inputs_are_refused(single_rank):
    from megatron.core.packed_seq_params import PackedSeqParams

    cfg = config()
    _, sdpa = core_attentions(cfg)
    q, k, v = qkv(cfg, torch.float32)
    with pytest.raises(ValueError, match="packed_seq_params"):
        sdpa(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="thd"))
    with pytest.raises(ValueError, match="attention_bias"):
        sdpa(q, k, v, None, attention_bias=torch.zeros(1, HEADS, SEQ, SEQ))
    with pytest.raises(ValueError, match="bool attention_mask"):
        sdpa(q, k, v, torch.zeros(1, 1, SEQ, SEQ))
    k2, v2 = qkv(cfg, torch.float32, sk=2 * SEQ)[1:]
    with pytest.raises(ValueError, match="sq == sk"):
        sdpa(q, k2, v2, None)


def test_multi_latent_attention_spec_is_refused():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from nemo_tst.attention import with_sdpa_core_attention

    with pytest.raises(ValueError, match="multi-latent attention"):
        with_sdpa_core_attention(get_gpt_layer_local_spec(multi_latent_attention=True))
