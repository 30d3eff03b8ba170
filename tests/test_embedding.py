"""SuperpositionEmbedding against explicit bag-mean loops, at TP=1 and TP=2 (also with SP)."""

import pytest
import torch
import torch.distributed as dist

from tests.distributed import init_megatron_parallel, run_on_ranks

VOCAB, HIDDEN = 64, 16


def make_config(dtype=torch.float32, sequence_parallel=False, tp=1):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=1,
        hidden_size=HIDDEN,
        num_attention_heads=2,
        use_cpu_initialization=True,
        params_dtype=dtype,
        hidden_dropout=0.0,
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel,
    )


def make_embedding(config, bag_size, position_embedding_type="rope", tp_group=None):
    from nemo_tst import SuperpositionEmbedding

    torch.manual_seed(0)
    return SuperpositionEmbedding(
        config,
        vocab_size=VOCAB,
        max_sequence_length=32,
        position_embedding_type=position_embedding_type,
        tp_group=tp_group,
        bag_size=bag_size,
    )


def reference_bag_means(weight, input_ids, s, positions=None):
    """[b, L*s] ids -> [L, b, h]: mean of each bag's rows by explicit loops, fp32 sum."""
    b, n = input_ids.shape
    L = n // s
    bags = [
        [sum(weight[input_ids[r, i * s + j]].float() for j in range(s)) / s for r in range(b)]
        for i in range(L)
    ]
    out = torch.stack([torch.stack(row) for row in bags]).to(weight.dtype)  # [L, b, h]
    if positions is not None:
        out = out + positions[:L].unsqueeze(1)
    return out


@pytest.fixture(scope="module")
def megatron_world():
    import os

    from tests.distributed import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1)
    init_megatron_parallel()
    yield


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("s", [1, 2, 4, 16])
@pytest.mark.parametrize("position_embedding_type", ["rope", "learned_absolute"])
def test_bag_means_and_grads_match_loops(megatron_world, s, dtype, atol, position_embedding_type):
    emb = make_embedding(make_config(dtype), s, position_embedding_type)
    L, b = 3, 2
    ids = torch.randint(0, VOCAB, (b, L * s), generator=torch.Generator().manual_seed(s))
    pos = torch.arange(L).expand(b, L)
    upstream = torch.randn(L, b, HIDDEN).to(dtype)

    out = emb(ids, pos)
    (out.float() * upstream.float()).sum().backward()

    weight = emb.word_embeddings.weight.detach().clone().requires_grad_(True)
    positions = None
    if position_embedding_type == "learned_absolute":
        positions = emb.position_embeddings.weight.detach().clone().requires_grad_(True)
    want = reference_bag_means(weight, ids, s, positions)
    (want.float() * upstream.float()).sum().backward()

    assert out.shape == (L, b, HIDDEN) and out.dtype == want.dtype
    torch.testing.assert_close(out.float(), want.float(), atol=atol, rtol=0)
    torch.testing.assert_close(
        emb.word_embeddings.weight.grad.float(), weight.grad.float(), atol=atol, rtol=0
    )
    if positions is not None:
        torch.testing.assert_close(emb.position_embeddings.weight.grad, positions.grad)


def test_s1_is_language_model_embedding_and_state_dict_is_vanilla(megatron_world):
    from megatron.core.models.common.embeddings.language_model_embedding import (
        LanguageModelEmbedding,
    )

    config = make_config()
    torch.manual_seed(0)
    vanilla = LanguageModelEmbedding(config, VOCAB, 32, "learned_absolute")
    tst = make_embedding(config, 1, "learned_absolute")
    assert {k: v.shape for k, v in vanilla.state_dict().items()} == {
        k: v.shape for k, v in tst.state_dict().items()
    }
    tst.load_state_dict(vanilla.state_dict())
    ids = torch.randint(0, VOCAB, (2, 7))
    pos = torch.arange(7).expand(2, 7)
    assert torch.equal(tst(ids, pos), vanilla(ids, pos))


def test_bad_input_length_raises(megatron_world):
    emb = make_embedding(make_config(), 4)
    with pytest.raises(ValueError, match=r"must be \[batch, L\*4\]"):
        emb(torch.zeros(2, 10, dtype=torch.long), None)


def _tp2_worker(rank, world_size, s, sequence_parallel):
    import megatron.core.tensor_parallel.mappings as mappings

    init_megatron_parallel(tp=world_size)
    tp = dist.group.WORLD
    L, b = 4, 3
    ids = torch.randint(0, VOCAB, (b, L * s), generator=torch.Generator().manual_seed(3))
    upstream = torch.randn(L, b, HIDDEN, generator=torch.Generator().manual_seed(4))

    # Each collective's row count, to show the bags are averaged before the TP reduction.
    moved = []
    all_reduce, reduce_scatter = torch.distributed.all_reduce, mappings.dist_reduce_scatter_func

    def recording_all_reduce(tensor, *args, **kwargs):
        moved.append(tensor.numel() // HIDDEN)
        return all_reduce(tensor, *args, **kwargs)

    def recording_reduce_scatter(output, input_, *args, **kwargs):
        moved.append(input_.numel() // HIDDEN)
        return reduce_scatter(output, input_, *args, **kwargs)

    torch.distributed.all_reduce = recording_all_reduce
    mappings.dist_reduce_scatter_func = recording_reduce_scatter
    try:
        emb = make_embedding(make_config(sequence_parallel=sequence_parallel, tp=2), s, tp_group=tp)
        out = emb(ids, None)
    finally:
        torch.distributed.all_reduce, mappings.dist_reduce_scatter_func = all_reduce, reduce_scatter
    assert moved == [L * b], moved

    # The full table, gathered from the two vocab shards.
    shards = [torch.empty_like(emb.word_embeddings.weight) for _ in range(world_size)]
    dist.all_gather(shards, emb.word_embeddings.weight.detach())
    weight = torch.cat(shards).requires_grad_(True)
    want = reference_bag_means(weight, ids, s)
    (want * upstream).sum().backward()

    if sequence_parallel:  # [L/tp, b, h]: this rank's slice of the latent positions
        rows = slice(rank * L // world_size, (rank + 1) * L // world_size)
        want, upstream = want[rows], upstream[rows]
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)
    (out * upstream).sum().backward()
    per_rank = VOCAB // world_size
    torch.testing.assert_close(
        emb.word_embeddings.weight.grad,
        weight.grad[rank * per_rank : (rank + 1) * per_rank],
        atol=1e-6,
        rtol=0,
    )


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tensor_parallel_2_matches_full_table(sequence_parallel):
    run_on_ranks(_tp2_worker, 2, 4, sequence_parallel)
