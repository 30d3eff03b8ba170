"""The `tst_tiny` recipe on CPU, both phases, against its checked-in loss curve
(tests/golden/tst_tiny_cpu_losses.json): a change to the numbers a run produces (the loss, its
weighting, the bags, the data order, the schedule, the handoff) fails here even when every
other test still passes.

The run is `nemo-tst pretrain` on one CPU process, 30 iterations (phase 1 the first 9, s = 4),
on a synthetic corpus this module writes from a seeded generator (so the curve does not depend
on which Python's standard library is installed). The JSON holds the command's settings, the
versions it was made with, and the tolerance with the measurements it was chosen from: every
loss within 5e-5 (relative) of the checked-in one. The same run twice gave identical losses,
one thread against two differed by 1.7e-7; a 1% higher LR moved the losses by 1.2e-3, s = 3
instead of 4 by 0.48. Perturbing the uniform target weights by 1% fails the test.

Regenerate it after an intended numerical change, and say why in the commit:

    PYTHONPATH=$PWD .venv/bin/python -m tests.test_golden_curve --write
"""

import json
import math
import random
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden" / "tst_tiny_cpu_losses.json"
CORPUS_SEED, DOCUMENTS, WORDS = 1234, 400, 300
# Recipe overrides on top of `tst_tiny` (30 iterations, s = 4, r = 0.3): one process, a loss on
# every iteration.
OVERRIDES = ["cpu=true", "training.log_interval=1"]


def write_corpus(directory: Path) -> None:
    """DOCUMENTS text files of made-up words, each word followed by one of four fixed
    successors: a language with structure to learn, the same on every machine (Python's
    `random` with a seed gives the same sequence on every version and platform)."""
    rng = random.Random(CORPUS_SEED)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocabulary = sorted({"".join(rng.choice(letters) for _ in range(rng.randint(2, 7)))
                         for _ in range(WORDS)})
    successors = {word: rng.sample(vocabulary, 4) for word in vocabulary}
    directory.mkdir(parents=True)
    for d in range(DOCUMENTS):
        word, words = rng.choice(vocabulary), []
        for _ in range(rng.randint(80, 160)):
            words.append(word)
            word = rng.choice(successors[word])
        (directory / f"doc{d:04d}.txt").write_text(" ".join(words) + ".\n")


def prepare_data(out: Path) -> dict:
    """The corpus, a byte-level BPE of the recipe's vocabulary size, and Megatron indexed
    datasets (`<out>/golden_train`, `_valid`: documents alternate between train and held-out
    by a seeded split)."""
    from nemo_tst.data import HFTokenizer, iter_texts, preprocess, train_bpe

    corpus = out / "corpus"
    write_corpus(corpus)
    files = sorted(corpus.iterdir())
    train, valid = [f for i, f in enumerate(files) if i % 10], [f for i, f in enumerate(files) if not i % 10]
    tokenizer_path = out / "tokenizer.json"
    train_bpe(iter_texts(train), vocab_size=1024, save_path=tokenizer_path)
    result = preprocess(train, str(out / "golden"), HFTokenizer.from_file(tokenizer_path),
                        held_out_inputs=valid, workers=1, overwrite=True, progress=False)
    return {"prefix": result.train.prefix.removesuffix("_train"), "tokenizer": str(tokenizer_path)}


def golden_argv(data: dict, save: Path) -> list[str]:
    from nemo_tst.recipes.catalog import load_recipe

    recipe = load_recipe("tst_tiny", gpus=1, overrides=[
        *OVERRIDES, f"data.prefix={data['prefix']}", f"data.tokenizer={data['tokenizer']}",
        f"run_dir={save}",
    ])
    return recipe.megatron_args()


def run_losses(out: Path, threads: int = 1) -> dict:
    """Train `tst_tiny` once in `out`; per-iteration training losses (phase 1: the multi-hot
    loss) and the held-out losses, keyed by iteration."""
    from tests.test_training_e2e import run_pretrain

    data = prepare_data(out / "data")
    save = out / "run"
    log, _ = run_pretrain(save, golden_argv(data, save), env={"OMP_NUM_THREADS": str(threads)})
    return {"train": {str(it): log.loss(it) for it in sorted(log.train)},
            "phase": {str(it): log.phase[it] for it in sorted(log.phase)},
            "valid": {str(it): v for it, v in sorted(log.valid.items())}}


def relative_gap(a: dict, b: dict) -> float:
    """The largest relative difference of two loss dicts over the same iterations."""
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(abs(a[k] - b[k]) / abs(b[k]) for k in a)


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


def test_tst_tiny_on_cpu_reproduces_the_golden_loss_curve(golden, tmp_path):
    """Every training and held-out loss within the stated relative tolerance of the checked-in
    curve; the phase of every iteration as checked in."""
    got = run_losses(tmp_path)
    want = golden["losses"]
    assert got["phase"] == want["phase"]
    tolerance = golden["tolerance"]["relative"]
    for kind in ("train", "valid"):
        gap = relative_gap(got[kind], want[kind])
        assert gap <= tolerance, (
            f"{kind} losses moved by up to {gap:.2e} (relative), above the tolerance "
            f"{tolerance:.0e}: a numerical change. If it is intended, regenerate "
            f"{GOLDEN.name} (see this module's docstring).\n"
            f"got  {got[kind]}\nwant {want[kind]}"
        )


def test_the_golden_curve_is_both_phases_and_learns(golden):
    """The checked-in curve is what the test claims to guard: both phases, 30 iterations,
    phase 1 the first 9, a loss that falls."""
    losses = golden["losses"]
    assert [losses["phase"][str(it)] for it in range(1, 31)] == [1] * 9 + [2] * 21
    assert all(math.isfinite(v) for v in losses["train"].values())
    assert losses["train"]["30"] < losses["train"]["10"] < losses["train"]["1"]
    assert golden["tolerance"]["relative"] < golden["tolerance"]["smallest_real_change"] / 10


def _write() -> None:
    import tempfile

    import megatron.core
    import tokenizers
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        losses = run_losses(Path(tmp))
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    golden.update({
        "command": "nemo-tst pretrain --nproc-per-node 1 <load_recipe('tst_tiny', gpus=1, "
                   f"overrides={OVERRIDES} + data, run_dir).megatron_args()>",
        "data": f"tests/test_golden_curve.py write_corpus: {DOCUMENTS} documents, seed "
                f"{CORPUS_SEED}, byte-level BPE of 1024, every tenth document held out",
        "versions": {"torch": torch.__version__, "megatron-core": megatron.core.__version__,
                     "tokenizers": tokenizers.__version__, "python": sys.version.split()[0]},
        "losses": losses,
    })
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(golden, indent=2) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(f"usage: python -m tests.test_golden_curve --write  (rewrites {GOLDEN})")
    _write()
