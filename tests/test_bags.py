"""Bags and next-bag targets against explicit loops; the SuperpositionConfig checks."""

import pytest
import torch

from nemo_tst import SuperpositionConfig, make_superposition_batch
from nemo_tst.superposition.bags import num_latent_positions

EOD = 0


def reference_batch(text, s, mode, loss_mask=None, mask_cross_document=False):
    """Explicit loops over positions and targets, straight from the method's description."""
    s_in = 1 if mode == "output_only" else s
    k = 1 if mode == "input_only" else s
    b, n = text.shape
    L = (n - k) // s_in
    inputs = text[:, : L * s_in]
    targets = torch.zeros(b, L, k, dtype=torch.long)
    mask = torch.ones(b, L, k)
    for r in range(b):
        for i in range(L):
            last_input = (i + 1) * s_in - 1
            for j in range(k):
                t = (i + 1) * s_in + j
                targets[r, i, j] = text[r, t]
                if loss_mask is not None:
                    mask[r, i, j] = loss_mask[r, t - 1]
                if mask_cross_document and any(
                    int(text[r, p]) == EOD for p in range(last_input, t)
                ):
                    mask[r, i, j] = 0.0
    return inputs, targets, mask


@pytest.mark.parametrize("mode", ["full", "input_only", "output_only"])
@pytest.mark.parametrize("s", [1, 2, 4, 16])
def test_bags_match_explicit_loops(s, mode):
    cfg = SuperpositionConfig(bag_size=s, mode=mode, mask_cross_document_targets=True)
    L, b = 5, 3
    gen = torch.Generator().manual_seed(s)
    text = torch.randint(0, 6, (b, cfg.sample_length(L)), generator=gen)  # many EODs (id 0)
    loss_mask = (torch.rand(b, text.size(1) - 1, generator=gen) > 0.2).float()

    batch = make_superposition_batch(text, cfg, loss_mask=loss_mask, eod_id=EOD)
    inputs, targets, mask = reference_batch(text, s, mode, loss_mask, mask_cross_document=True)

    assert torch.equal(batch.input_ids, inputs)
    assert torch.equal(batch.targets, targets)
    assert torch.equal(batch.target_mask, mask)
    assert torch.equal(batch.position_ids, torch.arange(L).expand(b, L))


def test_s1_is_megatrons_tokens_and_labels():
    text = torch.arange(20).view(2, 10)
    batch = make_superposition_batch(text, SuperpositionConfig(bag_size=1))
    assert torch.equal(batch.input_ids, text[:, :-1])
    assert torch.equal(batch.targets[..., 0], text[:, 1:])


def test_full_mode_position_i_predicts_bag_i_plus_1():
    text = torch.arange(3 * 4 + 3).unsqueeze(0)  # s=3, L=4
    batch = make_superposition_batch(text, SuperpositionConfig(bag_size=3))
    assert batch.input_ids.tolist() == [list(range(12))]
    assert batch.targets[0].tolist() == [[3, 4, 5], [6, 7, 8], [9, 10, 11], [12, 13, 14]]


def test_document_boundaries_kept_by_default_masked_on_request():
    # s=2, L=3: bags [5, 6] [EOD, 7] [8, 9], targets [EOD, 7] [8, 9] [1, 2]
    text = torch.tensor([[5, 6, EOD, 7, 8, 9, 1, 2]])
    kept = make_superposition_batch(text, SuperpositionConfig(bag_size=2), eod_id=EOD)
    assert kept.target_mask.eq(1).all()
    masked = make_superposition_batch(
        text, SuperpositionConfig(bag_size=2, mask_cross_document_targets=True), eod_id=EOD
    )
    # Predicting the EOD itself is kept; 7 starts a new document after the bag [5, 6].
    assert masked.target_mask[0].tolist() == [[1.0, 0.0], [1.0, 1.0], [1.0, 1.0]]


@pytest.mark.parametrize("n", [10, 3])
def test_sequence_not_divisible_into_bags_raises(n):
    with pytest.raises(ValueError, match="does not split into bags"):
        make_superposition_batch(torch.zeros(1, n, dtype=torch.long), SuperpositionConfig(bag_size=4))


def test_latent_positions_from_sample_length():
    cfg = SuperpositionConfig(bag_size=6)
    assert num_latent_positions(cfg, cfg.sample_length(128)) == 128
    assert cfg.text_tokens_per_sample(128) == 768


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"bag_size": 0}, "must be >= 1"),
        ({"bag_size": 2.5}, "must be an integer"),
        ({"bag_size": True}, "must be an integer"),
        ({"bag_size": 4, "mode": "both"}, "mode must be one of"),
        ({"bag_size": 4, "weighting": "linear"}, "weighting must be one of"),
        ({"bag_size": 4, "target_weights": [1, 1]}, "has 2 entries"),
        ({"bag_size": 2, "target_weights": [1, -1]}, "must be finite"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SuperpositionConfig(**kwargs)


def test_weightings_sum_to_one_and_follow_the_paper():
    import math

    assert SuperpositionConfig(bag_size=4).weights() == [0.25] * 4
    power = SuperpositionConfig(bag_size=3, weighting="power").weights()
    assert power == pytest.approx([x / (1 + 1 / 2 + 1 / 3) for x in (1, 1 / 2, 1 / 3)])
    exp = SuperpositionConfig(bag_size=3, weighting="exp").weights()
    z = sum(math.exp(-i) for i in (1, 2, 3))
    assert exp == pytest.approx([math.exp(-i) / z for i in (1, 2, 3)])
    assert SuperpositionConfig(bag_size=3, weighting="first").weights() == [1.0, 0.0, 0.0]
    assert SuperpositionConfig(bag_size=2, target_weights=[3, 1]).weights() == [0.75, 0.25]
    assert SuperpositionConfig(bag_size=4, mode="input_only").weights() == [1.0]
