"""The phase-aware training data: no token is an input twice across phases, resumes re-read the
same samples, and a plan larger than the corpus is reported."""

import numpy as np
import pytest

from nemo_tst.core.data import TSTTrainDataset, item_sequence_length, items_needed, pieces_per_item
from nemo_tst.core.plan import TSTPlan
from nemo_tst.core.settings import TSTSettings
from nemo_tst.training.driver import check_corpus_budget

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
    return TSTPlan(settings=TSTSettings(bag_size=s, mode=mode), seq_length=L,
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


def item_of_token(items, plan) -> dict:
    """Which item each (unique) input token belongs to, read off the items themselves (an
    item's last text token is the next item's first, so only inputs identify an item)."""
    owner = {}
    for i in range(items_needed(plan)):
        for t in items[i]["tokens"]:
            if t != EOD:
                assert int(t) not in owner
                owner[int(t)] = i
    return owner


def global_batches(plan, dataset_len, micro_batch_size, dp, consumed=0):
    """The sample indices of each global batch, as Megatron's pretraining sampler deals them
    to `dp` data-parallel ranks (each rank's micro-batches, gathered per global batch)."""
    from megatron.training.datasets.data_samplers import MegatronPretrainingSampler

    total = plan.train_iters * plan.global_batch_size
    per_rank = [iter(MegatronPretrainingSampler(total, consumed, micro_batch_size, r, dp))
                for r in range(dp)]
    steps_left = (total - consumed) // plan.global_batch_size
    micro_per_step = plan.global_batch_size // (micro_batch_size * dp)
    batches = []
    for _ in range(steps_left):
        batch = []
        for _ in range(micro_per_step):
            for it in per_rank:
                batch += next(it)
        batches.append(sorted(batch))
    assert all(j < dataset_len for b in batches for j in b)
    return batches


@pytest.mark.parametrize("s,gbs,mbs,dp,N,n1", [
    (4, 8, 2, 2, 24, 7),   # B a multiple of s
    (3, 8, 4, 1, 24, 5),   # B not a multiple of s
    (6, 4, 1, 2, 30, 9),   # s > B
    (2, 6, 3, 2, 20, 6),
])
def test_every_phase2_global_batch_holds_distinct_items(corpus, tmp_path, s, gbs, mbs, dp, N, n1):
    """The baseline's global batch is B independent windows; phase 2's must be too, not B / s
    texts each cut into s adjacent windows."""
    prefix, vocab = corpus
    plan = make_plan(s=s, L=8, gbs=gbs, N=N, n1=n1)
    items = build_items(prefix, vocab, plan, tmp_path)
    data = TSTTrainDataset(items, plan)
    owner = item_of_token(items, plan)
    batches = global_batches(plan, len(data), mbs, dp)
    assert len(batches) == N
    for step, batch in enumerate(batches[n1:], start=n1):
        item_ids = []
        for j in batch:
            tokens = [int(t) for t in data[j]["tokens"] if t != EOD]
            sample_items = {owner[t] for t in tokens}
            assert len(sample_items) == 1, "a phase-2 sample spans two items"
            item_ids += sample_items
        assert len(set(item_ids)) == gbs, f"step {step}: only {len(set(item_ids))} distinct items"


def test_a_resumed_sampler_reads_the_samples_of_the_uninterrupted_run(corpus, tmp_path):
    prefix, vocab = corpus
    plan = make_plan(s=4, L=8, gbs=8, N=24, n1=7)
    data = TSTTrainDataset(build_items(prefix, vocab, plan, tmp_path), plan)
    whole = global_batches(plan, len(data), 2, 2)
    for stop in (3, 7, 8, 15):  # inside phase 1, at the switch, inside phase 2
        resumed = global_batches(plan, len(data), 2, 2, consumed=stop * plan.global_batch_size)
        assert resumed == whole[stop:]
        for a, b in zip(whole[stop:stop + 2], resumed[:2]):
            assert all(np.array_equal(data[i]["tokens" if "tokens" in data[i] else "text"],
                                      data[k]["tokens" if "tokens" in data[k] else "text"])
                       for i, k in zip(a, b))


def test_the_baseline_mapping_is_the_identity(corpus, tmp_path):
    """s = 1: sample j is item j in both phases, so a baseline reads what plain Megatron reads."""
    prefix, vocab = corpus
    plan = make_plan(s=1, L=16, gbs=4, N=40, n1=12)
    items = build_items(prefix, vocab, plan, tmp_path)
    data = TSTTrainDataset(items, plan)
    assert len(data) == len(items)
    for j in range(plan.train_iters * plan.global_batch_size):
        item = items[j]
        sample = data[j]
        if j < plan.phase1_samples:
            text = np.concatenate([item["tokens"], item["labels"][-1:]])
            assert np.array_equal(sample["text"].numpy(), text)
        else:
            assert np.array_equal(sample["tokens"].numpy(), item["tokens"])
            assert np.array_equal(sample["labels"].numpy(), item["labels"])
            assert np.array_equal(sample["loss_mask"].numpy(), item["loss_mask"])


def build_provider(pretrain, monkeypatch, prefix, vocab, plan, *, seed, cache):
    """`pretrain.train_valid_test_datasets_provider` as a rank calls it, for --seed `seed`."""
    import argparse

    import megatron.training

    args = argparse.Namespace(
        seed=seed, data_path=None, data_args_path=None, per_split_data_args_path=None,
        train_data_path=[prefix], valid_data_path=[prefix], test_data_path=None, split=None,
        data_cache_path=str(cache), eod_mask_loss=False,
        mid_level_dataset_surplus=0.005, eval_iters=2, global_batch_size=plan.global_batch_size,
        seq_length=plan.seq_length,
    )
    monkeypatch.setattr(megatron.training, "get_args", lambda: args)
    monkeypatch.setattr(pretrain, "_is_dataset_built_on_rank", lambda vp_stage=None: True)
    return lambda valid_n: pretrain.train_valid_test_datasets_provider(
        [items_needed(plan), valid_n, 0], plan=plan, tokenizer=UniqueIdTokenizer(vocab))


def test_held_out_samples_do_not_depend_on_the_seed(corpus, tmp_path, monkeypatch):
    """Runs of different --seed (the seeds of a comparison) are scored on the same held-out
    samples, while the seed still reorders the training data."""
    from nemo_tst.training import pretrain

    prefix, vocab = corpus
    plan = make_plan(s=4, L=16, gbs=4, N=40, n1=12)
    runs = {}
    for seed in (1234, 99):
        train, valid, _ = build_provider(pretrain, monkeypatch, prefix, vocab, plan, seed=seed,
                                         cache=tmp_path / f"seed{seed}")(16)
        runs[seed] = ([valid[i]["tokens"].numpy() for i in range(16)],
                      [train[i]["text"].numpy() for i in range(8)])  # phase-1 samples
    (valid_a, train_a), (valid_b, train_b) = runs[1234], runs[99]
    assert all(np.array_equal(a, b) for a, b in zip(valid_a, valid_b))
    assert not all(np.array_equal(a, b) for a, b in zip(train_a, train_b))


def test_held_out_samples_do_not_depend_on_the_run_length(corpus, tmp_path, monkeypatch):
    """Runs of different --train-iters (the iso-loss baselines) must score the same held-out
    samples; Megatron asks for more validation samples the longer the run, and past one epoch
    of the held-out data GPTDataset would shuffle them differently."""
    from nemo_tst.training import pretrain

    prefix, vocab = corpus
    plan = make_plan(s=4, L=16, gbs=4, N=40, n1=12)

    def held_out(valid_n, cache):
        _, valid, _ = build_provider(pretrain, monkeypatch, prefix, vocab, plan, seed=1234,
                                     cache=tmp_path / cache)(valid_n)
        assert len(valid) >= valid_n
        return [valid[i]["tokens"].numpy() for i in range(valid_n)]

    one_epoch = 8000 // (plan.seq_length + 1)
    short, long = held_out(40, "a"), held_out(3 * one_epoch, "b")
    assert all(np.array_equal(a, b) for a, b in zip(short, long[:40]))
    # and every evaluation reads the same samples
    per_evaluation = 2 * plan.global_batch_size
    assert all(np.array_equal(long[i], long[i % per_evaluation]) for i in range(len(long)))
