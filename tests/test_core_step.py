"""`phase1_forward`, the phase-1 forward both adapters' forward steps call, against a plain
PyTorch reference: bag means of the embedding table fed to the same weights, torch's CE."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from tests.test_model import BATCH, L, VOCAB, build, causal_mask


def phase1_text(s, seed=0, eod_every=None):
    """A phase-1 sample's text [b, s·L + s] (and its loss mask), an EOD every `eod_every` ids."""
    from nemo_tst import SuperpositionConfig

    n = SuperpositionConfig(bag_size=s).sample_length(L)
    text = torch.randint(1, VOCAB, (BATCH, n), generator=torch.Generator().manual_seed(seed))
    if eod_every:
        text[:, eod_every::eod_every] = 0
    return text, torch.ones(BATCH, n - 1)


def reference_ce(model, text, s):
    """Per-target CE [b, L, s] in plain PyTorch: latent position i embeds the mean of bag i's
    table rows and predicts each token of bag i+1."""
    from nemo_tst import set_superposition

    set_superposition(model, None)
    table = model.embedding.word_embeddings.weight
    bags = text[:, : s * L].view(BATCH, L, s)
    targets = text[:, s: s * (L + 1)].view(BATCH, L, s)
    bag_means = table[bags].mean(dim=2)  # [b, L, s, h] -> [b, L, h]
    logits = model(None, None, causal_mask(L), decoder_input=bag_means.transpose(0, 1))  # [b, L, V]
    return torch.stack(
        [F.cross_entropy(logits.reshape(-1, VOCAB), targets[..., j].reshape(-1), reduction="none")
         for j in range(s)], dim=-1,
    ).view(BATCH, L, s)


@pytest.mark.parametrize("s", [1, 3])
def test_phase1_forward_scores_next_bags_of_bag_means(single_rank, s):
    from nemo_tst import SuperpositionConfig
    from nemo_tst.core.step import phase1_forward

    config = SuperpositionConfig(bag_size=s)
    model = build()
    text, loss_mask = phase1_text(s)
    out = phase1_forward(model, text, loss_mask, config)
    torch.testing.assert_close(out.per_target_ce, reference_ce(model, text, s), atol=1e-5, rtol=1e-5)
    assert torch.equal(out.target_mask, torch.ones(BATCH, L, s))
    assert out.target_weights.dtype == torch.float32
    torch.testing.assert_close(out.target_weights, torch.full((s,), 1 / s), atol=0, rtol=0)


def test_phase1_forward_masks_targets_across_a_document_end_with_the_eod_id(single_rank):
    from nemo_tst import SuperpositionConfig, make_superposition_batch
    from nemo_tst.core.step import phase1_forward

    config = SuperpositionConfig(bag_size=4, mask_cross_document_targets=True)
    text, loss_mask = phase1_text(4, eod_every=7)
    out = phase1_forward(build(), text, loss_mask, config, eod_id=0)
    want = make_superposition_batch(text, config, loss_mask=loss_mask, eod_id=0).target_mask
    assert 0 < out.target_mask.sum() < out.target_mask.numel()  # some targets masked, not all
    assert torch.equal(out.target_mask, want)


def test_phase1_forward_runs_this_ranks_context_parallel_share(single_rank):
    """With cp = 2, rank r's model sees latent-position chunks r and 3-r of 4 (the zig-zag),
    and the targets and mask it returns are those chunks' (the reference's, chunked)."""
    from nemo_tst import SuperpositionConfig
    from nemo_tst.core.step import phase1_forward

    s, config = 2, SuperpositionConfig(bag_size=2)
    text, loss_mask = phase1_text(s)
    model = build()
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["position_ids"]),
                                    with_kwargs=True)
    chunk = L // 4
    for rank in (0, 1):
        out = phase1_forward(model, text, loss_mask, config, cp_rank=rank, cp_size=2)
        kept = [*range(rank * chunk, (rank + 1) * chunk), *range((3 - rank) * chunk, (4 - rank) * chunk)]
        assert torch.equal(seen[-1], torch.tensor(kept).expand(BATCH, -1))
        assert out.per_target_ce.shape == out.target_mask.shape == (BATCH, L // 2, s)


def test_phase1_forward_calls_the_model_inside_the_forward_context(single_rank):
    """Bridge's straggler timer wraps the model call, and only the model call."""
    from nemo_tst import SuperpositionConfig
    from nemo_tst.core.step import phase1_forward

    events = []
    model = build()
    model.register_forward_pre_hook(lambda *_: events.append("forward"))

    @contextlib.contextmanager
    def timed():
        events.append("enter")
        yield
        events.append("exit")

    text, loss_mask = phase1_text(2)
    phase1_forward(model, text, loss_mask, SuperpositionConfig(bag_size=2), forward_context=timed())
    assert events == ["enter", "forward", "exit"]
