"""The phase-aware training data: no token is an input twice across phases, resumes re-read the
same samples, and a plan larger than the corpus is reported."""

import numpy as np
import pytest

from nemo_tst.superposition import SuperpositionConfig
from nemo_tst.training.arguments import TSTPlan
from nemo_tst.training.data import (
    TSTTrainDataset,
    check_corpus_budget,
    item_sequence_length,
    items_needed,
    pieces_per_item,
)

EOD = 0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Documents whose tokens are all distinct (ids 1, 2, 3, ...), each ended by EOD (0)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path_factory.mktemp("corpus") / "unique")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    rng = np.random.default_rng(0)
    next_id, total = 1, 0
    while total < 8000:
        n = int(rng.integers(5, 120))
        doc = np.concatenate([np.arange(next_id, next_id + n, dtype=np.int32), [EOD]])
        builder.add_document(doc, [len(doc)])
        next_id, total = next_id + n, total + len(doc)
    builder.finalize(prefix + ".idx")
    return prefix, next_id


class UniqueIdTokenizer:
    """What GPTDataset reads from a tokenizer: eod, pad, vocab size, a cache identity."""

    def __init__(self, vocab_size):
        self.vocab_size, self.eod, self.pad = vocab_size, EOD, -1
        self.unique_identifiers = {"class": "UniqueIdTokenizer", "vocab": vocab_size}


def build_items(prefix, vocab, plan, cache):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=1234, sequence_length=item_sequence_length(plan),
        blend_per_split=[([prefix], None), None, None], path_to_cache=str(cache),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        tokenizer=UniqueIdTokenizer(vocab),
    )
    items, _, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [items_needed(plan), None, None], lambda: True, config
    ).build()
    return items


def make_plan(s=4, mode="full", L=16, gbs=4, N=40, n1=12):
    return TSTPlan(superposition=SuperpositionConfig(bag_size=s, mode=mode), seq_length=L,
                   global_batch_size=gbs, train_iters=N, phase1_iters=n1)


def input_tokens(sample, plan):
    if "text" in sample:  # phase 1: the s*L tokens the embedding averages
        n = plan.superposition.text_tokens_per_sample(plan.seq_length)
        return sample["text"][:n].numpy()
    return sample["tokens"].numpy()


@pytest.mark.parametrize("s,mode", [(4, "full"), (3, "input_only"), (4, "output_only"), (1, "full")])
def test_no_token_is_an_input_twice_across_phases(corpus, tmp_path, s, mode):
    prefix, vocab = corpus
    plan = make_plan(s=s, mode=mode)
    assert check_corpus_budget(plan, 8000, strict=True) is None  # one epoch holds the plan
    data = TSTTrainDataset(build_items(prefix, vocab, plan, tmp_path), plan)
    samples = [data[j] for j in range(plan.train_iters * plan.global_batch_size)]

    phase1 = samples[: plan.phase1_samples]
    assert all("text" in x for x in phase1) and not any("text" in x for x in samples[len(phase1):])
    assert all(len(x["text"]) == plan.superposition.sample_length(plan.seq_length) for x in phase1)

    seen = np.concatenate([input_tokens(x, plan) for x in samples])
    seen = seen[seen != EOD]
    assert len(np.unique(seen)) == len(seen), "a text token was trained on twice"
    # Phase 1 consumed s times the text per sample that phase 2 does.
    p1 = sum(len(input_tokens(x, plan)) for x in phase1)
    assert p1 == plan.phase1_samples * plan.seq_length * plan.superposition.input_bag_size


def test_phase2_targets_are_the_next_tokens(corpus, tmp_path):
    prefix, vocab = corpus
    plan = make_plan()
    data = TSTTrainDataset(build_items(prefix, vocab, plan, tmp_path), plan)
    sample = data[plan.phase1_samples + 5]
    assert np.array_equal(sample["labels"][:-1].numpy(), sample["tokens"][1:].numpy())
    assert np.array_equal(sample["position_ids"].numpy(), np.arange(plan.seq_length))
    # GPTDataset indexes whole epochs, so there are at least the items the plan reads.
    assert len(data) >= plan.train_iters * plan.global_batch_size
    assert len(data) == plan.phase1_samples + (len(data.items) - plan.phase1_samples) * pieces_per_item(plan)


def test_a_rebuilt_dataset_yields_the_same_samples(corpus, tmp_path):
    """What a resumed run relies on: sample j is a function of j alone."""
    prefix, vocab = corpus
    plan = make_plan()
    a = TSTTrainDataset(build_items(prefix, vocab, plan, tmp_path / "a"), plan)
    b = TSTTrainDataset(build_items(prefix, vocab, plan, tmp_path / "b"), plan)
    for j in (0, plan.phase1_samples - 1, plan.phase1_samples, len(a) - 1):
        assert a[j].keys() == b[j].keys()
        assert all(np.array_equal(a[j][k], b[j][k]) for k in a[j])


def test_a_plan_larger_than_the_corpus_warns_or_fails_when_strict(caplog):
    plan = make_plan(N=4000)
    message = check_corpus_budget(plan, 8000, strict=False)
    assert message and "tokens will repeat" in message
    with pytest.raises(ValueError, match="--tst-strict-data"):
        check_corpus_budget(plan, 8000, strict=True)
