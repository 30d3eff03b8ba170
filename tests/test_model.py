"""TSTGPTModel: phase-1 wiring against a hand-built reference, TP=2, MoE EP=2, vanilla reload
(TSTHybridModel: tests/test_hybrid.py)."""


import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from nemo_tst import cpu
from tests.distributed import init_megatron_parallel, run_on_ranks

VOCAB, HIDDEN, L, BATCH = 96, 32, 8, 2


def tiny_config(tp=1, ep=1, moe=False):
    from megatron.core.transformer import TransformerConfig

    extra = {}
    if moe:
        extra = dict(
            num_moe_experts=4,
            moe_router_topk=2,
            moe_token_dispatcher_type="allgather",
            moe_aux_loss_coeff=1e-2,
            moe_router_load_balancing_type="aux_loss",
            expert_model_parallel_size=ep,
        )
    return TransformerConfig(
        num_layers=2,
        hidden_size=HIDDEN,
        ffn_hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        **cpu.MODEL_CPU_CONFIG,
        **extra,
    )


def build(cls_name="TSTGPTModel", tp=1, ep=1, moe=False, seed=1234):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from nemo_tst import TSTGPTModel

    torch.manual_seed(seed)
    cls = {"TSTGPTModel": TSTGPTModel, "GPTModel": GPTModel}[cls_name]
    return cls(
        config=tiny_config(tp, ep, moe),
        transformer_layer_spec=get_gpt_layer_local_spec(
            num_experts=4 if moe else None, normalization="RMSNorm"
        ),
        vocab_size=VOCAB,
        max_sequence_length=64,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    )


def phase1_batch(s, seed=0):
    from nemo_tst import SuperpositionConfig, make_superposition_batch

    cfg = SuperpositionConfig(bag_size=s)
    text = torch.randint(0, VOCAB, (BATCH, cfg.sample_length(L)), generator=torch.Generator().manual_seed(seed))
    return cfg, make_superposition_batch(text, cfg)


def causal_mask(n):
    from nemo_tst.cpu import causal_attention_mask

    return causal_attention_mask(n)


def phase1_loss(model, cfg, batch):
    from nemo_tst import reduce_multi_hot_loss, set_superposition

    set_superposition(model, cfg)
    per_target = model(
        batch.input_ids, batch.position_ids, causal_mask(L), labels=batch.targets
    )
    total, positions = reduce_multi_hot_loss(
        per_target, batch.target_mask, torch.tensor(cfg.weights())
    )
    return total / positions


def check_phase1_is_bag_means_through_the_vanilla_model(build, s):
    """Reference: bag means by hand, fed as decoder_input to the same weights, CE by torch.
    `build()` makes the TST model (a GPT or a hybrid one)."""
    from nemo_tst import set_superposition

    model = build()
    cfg, batch = phase1_batch(s)
    loss = phase1_loss(model, cfg, batch)
    loss.backward()

    set_superposition(model, None)
    weight = model.embedding.word_embeddings.weight
    ids = batch.input_ids.view(BATCH, L, s)
    bag_means = torch.stack([weight[ids[:, :, j]] for j in range(s)]).mean(0)  # [b, L, h]
    logits = model(None, None, causal_mask(L), decoder_input=bag_means.transpose(0, 1))
    # logits [b, L, V]; the paper's loss: mean over the s next-bag targets of torch's CE
    want = torch.stack(
        [F.cross_entropy(logits.reshape(-1, VOCAB), batch.targets[..., j].reshape(-1)) for j in range(s)]
    ).mean()
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=0)

    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    want.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("s", [2, 4])
def test_phase1_forward_is_bag_means_through_the_vanilla_model(single_rank, s):
    check_phase1_is_bag_means_through_the_vanilla_model(build, s)


@pytest.mark.parametrize("s", [1, 4])
def test_phase1_embeds_with_what_the_tables_forward_pre_hook_delivers(single_rank, s):
    """Megatron's DDP with --overlap-param-gather finishes a module's parameter all-gather in a
    forward pre-hook on that module. Phase 1 must call the word-embedding table so that hook
    runs: here the table starts stale (zeros) and a pre-hook on it writes the gathered weights,
    as DDP's does; the loss must be the one of the model built with those weights."""
    from nemo_tst import SuperpositionEmbedding

    cfg, batch = phase1_batch(s)
    want = phase1_loss(build(), cfg, batch)

    model = build()
    assert type(model.embedding) is SuperpositionEmbedding
    table = model.embedding.word_embeddings
    gathered = table.weight.detach().clone()
    with torch.no_grad():
        table.weight.zero_()
    calls = []

    def finish_param_gather(module, args):
        calls.append(tuple(args[0].shape))
        with torch.no_grad():
            module.weight.copy_(gathered)

    table.register_forward_pre_hook(finish_param_gather)
    loss = phase1_loss(model, cfg, batch)
    assert calls == [(BATCH, L * s)]
    assert torch.equal(loss, want)


def check_s1_phase1_equals_the_vanilla_model_bit_for_bit(tst, vanilla):
    """With s=1, phase 1's loss and gradients are the vanilla model's, bit for bit."""
    cfg, batch = phase1_batch(1)
    loss = phase1_loss(tst, cfg, batch)
    ce = vanilla(batch.input_ids, batch.position_ids, causal_mask(L), labels=batch.targets[..., 0])
    want = ce.sum() / ce.numel()
    assert torch.equal(loss, want)
    loss.backward()
    want.backward()
    for (name, p), q in zip(tst.named_parameters(), vanilla.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_s1_phase1_equals_vanilla_training_bit_for_bit(single_rank):
    check_s1_phase1_equals_the_vanilla_model_bit_for_bit(build(), build("GPTModel"))


def test_phase1_state_dict_loads_into_vanilla_gpt(single_rank):
    tst, vanilla = build(seed=1), build("GPTModel", seed=2)
    cfg, batch = phase1_batch(4)
    phase1_loss(tst, cfg, batch).backward()
    tst_sd = tst.state_dict()
    vanilla_sd = vanilla.state_dict()
    shapes = lambda sd: {k: getattr(v, "shape", None) for k, v in sd.items()}  # noqa: E731
    assert shapes(tst_sd) == shapes(vanilla_sd)
    result = vanilla.load_state_dict(tst_sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    from nemo_tst import set_superposition

    set_superposition(tst, None)  # phase 2: the vanilla forward
    ids = torch.randint(0, VOCAB, (BATCH, L))
    pos = torch.arange(L).expand(BATCH, L)
    assert torch.equal(tst(ids, pos, causal_mask(L)), vanilla(ids, pos, causal_mask(L)))


def test_mtp_is_refused_in_phase1(single_rank):
    from nemo_tst import SuperpositionConfig

    model = build()
    model.config.mtp_num_layers = 1
    try:
        with pytest.raises(ValueError, match="multi-token prediction"):
            model.set_superposition(SuperpositionConfig(bag_size=4))
    finally:
        model.config.mtp_num_layers = None


def gather_full_grads(model, world_size):
    """Each parameter's gradient with tensor-parallel shards concatenated along their split dim."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(g) for _ in range(world_size)]
            dist.all_gather(parts, g.contiguous())
            # A shard holds `partition_stride` chunks (gate and up of a GLU): chunk j of every
            # rank, then chunk j+1 of every rank.
            stride, dim = p.partition_stride, p.partition_dim
            chunks = [part.chunk(stride, dim=dim) for part in parts]
            g = torch.cat([chunks[r][j] for j in range(stride) for r in range(world_size)], dim)
        out[name] = g
    return out


def _tp2_worker(rank, world_size, build, s, out_path):
    init_megatron_parallel(tp=world_size)
    model = build(tp=world_size)
    cfg, batch = phase1_batch(s)
    loss = phase1_loss(model, cfg, batch)
    loss.backward()
    grads = gather_full_grads(model, world_size)
    if rank == 0:
        torch.save({"loss": loss.detach(), "grads": grads}, out_path)


def check_tensor_parallel_2_matches_tp1(build, out_dir):
    """Phase 1's loss and every gradient at TP=2 equal those of one rank. `build(tp=...)`
    makes the TST model (a GPT or a hybrid one); a module-level function, so the spawned ranks
    can unpickle it."""
    s = 4
    run_on_ranks(_tp2_worker, 2, build, s, str(out_dir / "tp2.pt"))
    tp2 = torch.load(out_dir / "tp2.pt")

    model = build()
    cfg, batch = phase1_batch(s)
    loss = phase1_loss(model, cfg, batch)
    loss.backward()
    torch.testing.assert_close(tp2["loss"], loss.detach(), atol=1e-5, rtol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(tp2["grads"][name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_tensor_parallel_2_matches_tp1(single_rank, tmp_path):
    check_tensor_parallel_2_matches_tp1(build, tmp_path)


def expert_key_for_rank(key, rank, experts_per_rank):
    """EP=1 state-dict key of the expert that EP rank `rank` holds as local expert i."""
    marker = ".local_experts."
    if marker not in key:
        return key
    head, tail = key.split(marker)
    i, rest = tail.split(".", 1)
    return f"{head}{marker}{rank * experts_per_rank + int(i)}.{rest}"


def _ep2_worker(rank, world_size, s, ep1_state, out_path):
    init_megatron_parallel(ep=world_size)
    model = build(ep=world_size, moe=True)
    local = model.state_dict()
    model.load_state_dict(
        {k: ep1_state[expert_key_for_rank(k, rank, 4 // world_size)] for k in local}, strict=True
    )
    cfg, batch = phase1_batch(s)  # every rank the same batch: EP must not change the math
    loss = phase1_loss(model, cfg, batch)
    loss.backward()
    router_grad = next(p.grad for n, p in model.named_parameters() if "router" in n)
    if rank == 0:
        torch.save({"loss": loss.detach(), "router_grad": router_grad}, out_path)


def test_moe_expert_parallel_2_runs_phase1_and_matches_ep1(single_rank, tmp_path):
    s = 4
    model = build(moe=True)
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}
    run_on_ranks(_ep2_worker, 2, s, state, str(tmp_path / "ep2.pt"))
    ep2 = torch.load(tmp_path / "ep2.pt")

    cfg, batch = phase1_batch(s)
    loss = phase1_loss(model, cfg, batch)
    loss.backward()
    router_grad = next(p.grad for n, p in model.named_parameters() if "router" in n)
    assert torch.isfinite(loss)
    torch.testing.assert_close(ep2["loss"], loss.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ep2["router_grad"], router_grad, atol=1e-5, rtol=1e-4)
