"""nemo_tst.data: lossless BPE, indexed-dataset preprocessing, the stdlib corpus, GPTDataset.

References are independent of the code under test: expected documents are written out by hand,
expected ids come from the wrapped Hugging Face tokenizer directly, and the written files are
read back with Megatron's own `IndexedDataset` and `GPTDataset`.
"""

import io
import json
import os
from pathlib import Path

import numpy
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from nemo_tst.data import (
    EOD_TOKEN,
    HFTokenizer,
    build_stdlib_corpus,
    iter_texts,
    preprocess,
    stdlib_root,
    train_bpe,
)

TRICKY = [
    "",
    "a",
    " leading space and trailing  ",
    "tabs\tand\r\nCRLF\rCR\n\n\n",
    "héllo wörld — ünïcödé “quotes” ©",
    "日本語のテキスト 中文 한국어",
    "emoji 🙂👍🏽 and a ZWJ family 👨‍👩‍👧",
    "combining e\u0301 and NBSP\u00a0and BOM\ufeff",
    "\x00\x01\x7f control bytes",
    "literal <|endoftext|> and <|pad|> text",
    "def f(x):\n    return x ** 2  # comment\n",
]

# Hand-written corpus: (relative path, text). Directory files are found in sorted order.
DIR_FILES = [
    ("docs/a.txt", "alpha document\nwith two lines\n"),
    ("docs/sub/b.md", "# Title\n\nbeta — ünïcödé\r\n"),
    ("docs/sub/c.py", "def gamma():\n    return 'γ'\n"),
    ("docs/sub/empty.txt", ""),
    ("docs/skip.bin", "not a document"),
]
SINGLE_FILE = ("top.txt", "   \n")  # whitespace only: kept
JSONL_RECORDS = [
    {"text": "first record 🙂"},
    {"text": ""},
    {"text": "third <|endoftext|>", "id": 3},
]
# Documents in input order [docs/, top.txt, data.jsonl], empty ones dropped.
EXPECTED = [
    "alpha document\nwith two lines\n",
    "# Title\n\nbeta — ünïcödé\r\n",
    "def gamma():\n    return 'γ'\n",
    "   \n",
    "first record 🙂",
    "third <|endoftext|>",
]


@pytest.fixture(scope="module")
def corpus():
    return build_stdlib_corpus(max_bytes=300_000)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_bpe(iter_texts(corpus.train), vocab_size=1024)


@pytest.fixture
def inputs(tmp_path):
    for rel, text in DIR_FILES + [SINGLE_FILE]:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("utf-8"))
    jsonl = tmp_path / "data.jsonl"
    lines = [json.dumps(r, ensure_ascii=False) for r in JSONL_RECORDS]
    jsonl.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n", encoding="utf-8")
    return [tmp_path / "docs", tmp_path / SINGLE_FILE[0], jsonl]


def _read_docs(prefix):
    dataset = IndexedDataset(prefix)
    assert list(dataset.document_indices) == list(range(len(dataset) + 1))  # one sequence each
    # Copies: IndexedDataset items view its mmap, which its __del__ closes (a segfault later).
    return [numpy.array(dataset[i]) for i in range(len(dataset))], dataset


def _aligned_find(haystack: bytes, needle: bytes) -> bool:
    """Whether `needle` occurs in `haystack` at a 4-byte (int32 token) boundary."""
    start = haystack.find(needle)
    while start != -1 and start % 4:
        start = haystack.find(needle, start + 1)
    return start != -1


def _expected_ids(tokenizer, text):
    return tokenizer.hf_tokenizer.encode(text, add_special_tokens=False).ids + [tokenizer.eod]


# ----- tokenizer -----------------------------------------------------------------------------


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_tricky(tokenizer, text):
    assert tokenizer.detokenize(tokenizer.tokenize(text)) == text


def test_round_trip_stdlib_files(tokenizer, corpus):
    for path in corpus.valid:
        text = path.read_bytes().decode("utf-8")
        assert tokenizer.detokenize(tokenizer.tokenize(text)) == text


def test_special_tokens_are_ids_not_text(tokenizer):
    assert (tokenizer.eod, tokenizer.pad) == (0, 1)
    assert tokenizer.vocab_size == 1024
    assert tokenizer.eod not in tokenizer.tokenize("x <|endoftext|> y")
    assert tokenizer.pad not in tokenizer.tokenize("<|pad|>")
    assert tokenizer.detokenize(tokenizer.tokenize("end") + [tokenizer.eod]) == "end" + EOD_TOKEN


def test_save_and_reload_gives_identical_ids(tokenizer, corpus, tmp_path):
    path = tokenizer.save(tmp_path / "tok")
    assert path == tmp_path / "tok" / "tokenizer.json"
    reloaded = HFTokenizer.from_file(path)
    assert reloaded.vocab == tokenizer.vocab
    assert (reloaded.eod, reloaded.pad, reloaded.vocab_size) == (0, 1, 1024)
    assert reloaded.unique_identifiers == tokenizer.unique_identifiers
    for text in TRICKY + [p.read_text(encoding="utf-8") for p in corpus.valid]:
        assert reloaded.tokenize(text) == tokenizer.tokenize(text)
    assert HFTokenizer.from_file(tmp_path / "tok").vocab == tokenizer.vocab  # directory form


def test_tokenizer_errors(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="tokenizer: .*does not exist"):
        HFTokenizer.from_file(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="vocab_size: 100 .*vocab_size >= 258"):
        train_bpe(["abc"], vocab_size=100)
    with pytest.raises(ValueError, match="eod_token: '<eos>' is not in the tokenizer"):
        HFTokenizer.from_str(tokenizer.to_str(), eod_token="<eos>")


# ----- preprocess ----------------------------------------------------------------------------


def test_preprocess_round_trip(inputs, tokenizer, tmp_path):
    result = preprocess(inputs, tmp_path / "out" / "ds", tokenizer, progress=False)
    assert result.valid is None and not os.path.exists(tmp_path / "out" / "ds_valid.bin")
    assert result.train.prefix == str(tmp_path / "out" / "ds_train")
    assert (result.vocab_size, result.eod_id, result.dtype) == (1024, 0, "uint16")
    assert result.empty_documents == 2
    docs, dataset = _read_docs(result.train.prefix)
    assert dataset[0].dtype == numpy.uint16
    assert [tokenizer.detokenize(d) for d in docs] == [t + EOD_TOKEN for t in EXPECTED]
    assert [d.tolist() for d in docs] == [_expected_ids(tokenizer, t) for t in EXPECTED]
    assert result.train.documents == len(EXPECTED)
    assert result.train.tokens == sum(len(d) for d in docs) == int(dataset.sequence_lengths.sum())


def test_preprocess_without_eod_and_other_field(tmp_path, tokenizer):
    path = tmp_path / "c.jsonl"
    path.write_text('{"body": "x y"}\n{"body": "z"}\n', encoding="utf-8")
    result = preprocess([path], tmp_path / "p", tokenizer, text_field="body", append_eod=False,
                        progress=False)
    docs, _ = _read_docs(result.train.prefix)
    assert [tokenizer.detokenize(d) for d in docs] == ["x y", "z"]


def test_held_out_fraction_is_by_document_and_deterministic(inputs, tokenizer, tmp_path):
    kwargs = dict(held_out_fraction=0.3, seed=3, progress=False)
    first = preprocess(inputs, tmp_path / "a", tokenizer, **kwargs)
    again = preprocess(inputs, tmp_path / "b", tokenizer, **kwargs)
    train = [tokenizer.detokenize(d) for d in _read_docs(first.train.prefix)[0]]
    valid = [tokenizer.detokenize(d) for d in _read_docs(first.valid.prefix)[0]]
    assert (first.train.documents, first.valid.documents) == (4, 2) == (len(train), len(valid))
    assert not set(train) & set(valid)
    assert sorted(train + valid) == sorted(t + EOD_TOKEN for t in EXPECTED)
    for split in ("train", "valid"):
        for ext in (".bin", ".idx"):
            a, b = (Path(getattr(r, split).prefix + ext).read_bytes() for r in (first, again))
            assert a == b
    other = preprocess(inputs, tmp_path / "c", tokenizer, **{**kwargs, "seed": 4})
    assert [tokenizer.detokenize(d) for d in _read_docs(other.valid.prefix)[0]] != valid


def test_workers_do_not_change_the_output(corpus, tokenizer, tmp_path):
    files = corpus.train[:12]
    results = [
        preprocess(files, tmp_path / f"w{w}", tokenizer, held_out_inputs=corpus.valid[:3],
                   workers=w, progress=False)
        for w in (1, 2)
    ]
    for split in ("train", "valid"):
        for ext in (".bin", ".idx"):
            one, two = (Path(getattr(r, split).prefix + ext).read_bytes() for r in results)
            assert one == two
    docs, _ = _read_docs(results[1].valid.prefix)
    assert [d.tolist() for d in docs] == [
        _expected_ids(tokenizer, p.read_bytes().decode("utf-8")) for p in corpus.valid[:3]
    ]


def test_overwrite_protection(inputs, tokenizer, tmp_path):
    prefix = tmp_path / "ds"
    preprocess(inputs, prefix, tokenizer, held_out_fraction=0.3, progress=False)
    before = Path(f"{prefix}_train.bin").read_bytes()
    with pytest.raises(ValueError, match=r"ds_train.bin already exists; pass overwrite=True"):
        preprocess(inputs, prefix, tokenizer, progress=False)
    assert Path(f"{prefix}_train.bin").read_bytes() == before
    result = preprocess(inputs, prefix, tokenizer, overwrite=True, progress=False)
    assert result.valid is None and not Path(f"{prefix}_valid.idx").exists()  # no stale split
    assert not list(tmp_path.glob("*.tmp"))


def test_preprocess_errors(inputs, tokenizer, tmp_path):
    def run(paths, **kw):
        return preprocess(paths, tmp_path / "e", tokenizer, progress=False, **kw)

    with pytest.raises(ValueError, match="inputs: .*nope.txt' does not exist"):
        run([tmp_path / "nope.txt"])
    (tmp_path / "bins").mkdir()
    (tmp_path / "bins" / "x.bin").write_text("x")
    with pytest.raises(ValueError, match=r"inputs: no documents found .*extensions"):
        run([tmp_path / "bins"])
    with pytest.raises(ValueError, match="inputs: all 1 documents are empty"):
        run([tmp_path / "docs" / "sub" / "empty.txt"])
    with pytest.raises(ValueError, match="tokenizer: .*does not exist"):
        preprocess(inputs, tmp_path / "e", tmp_path / "no" / "tokenizer.json", progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "x"}\n')
    with pytest.raises(ValueError, match="text_field: .*bad.jsonl:1 has no string field 'text'"):
        run([bad])
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin.txt is not UTF-8 text"):
        run([inputs[1], latin], workers=2)  # raised in a worker, re-raised here
    assert not list(tmp_path.glob("e_*"))  # nothing half-written
    with pytest.raises(ValueError, match="held_out_inputs and held_out_fraction"):
        run(inputs, held_out_inputs=inputs, held_out_fraction=0.1)
    with pytest.raises(ValueError, match="held_out_fraction: 1.0"):
        run(inputs, held_out_fraction=1.0)


def test_progress_is_quiet_off_a_tty(corpus, tokenizer, tmp_path):
    stream = io.StringIO()
    preprocess(corpus.train, tmp_path / "p", tokenizer, progress_stream=stream)
    lines = stream.getvalue().splitlines()
    assert 1 <= len(lines) <= 11 and "100.0%" in lines[-1] and "\r" not in stream.getvalue()


# ----- stdlib corpus -------------------------------------------------------------------------


def test_stdlib_corpus_is_split_by_file_and_deterministic(tmp_path):
    full = build_stdlib_corpus(tmp_path)
    assert full == build_stdlib_corpus()
    assert full.root == stdlib_root()
    assert len(full.train) > 100 and len(full.valid) > 5
    assert not set(full.train) & set(full.valid)
    for path in full.train + full.valid:
        rel = path.relative_to(full.root)
        assert path.suffix == ".py" and path.is_file() and path.stat().st_size > 0
        assert not {"site-packages", "test", "tests", "__pycache__"} & set(rel.parts[:-1])
    assert list(full.train) == sorted(full.train)
    assert 0.02 < len(full.valid) / (len(full.train) + len(full.valid)) < 0.1
    manifest = json.loads((tmp_path / "stdlib_corpus.json").read_text())
    assert len(manifest["train"]) == len(full.train) and manifest["valid"][0] in str(full.valid[0])
    small = build_stdlib_corpus(max_bytes=300_000)
    assert 0 < small.train_bytes + small.valid_bytes <= 300_000 and small.valid
    assert set(small.valid) <= set(full.valid) and set(small.train) <= set(full.train)
    assert build_stdlib_corpus(max_bytes=300_000, seed=1) != small


def test_corpus_on_a_tiny_tree(tmp_path):
    for rel, text in [("a.py", "a = 1\n"), ("pkg/b.py", "b = 2\n"), ("tests/t.py", "t\n"),
                      ("site-packages/s.py", "s\n"), ("e.py", "")]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    tiny = build_stdlib_corpus(root=tmp_path)
    assert sorted(tiny.train + tiny.valid) == [tmp_path / "a.py", tmp_path / "pkg" / "b.py"]
    assert len(tiny.valid) == 1
    with pytest.raises(ValueError, match="valid_fraction: 0"):
        build_stdlib_corpus(root=tmp_path, valid_fraction=0)


# ----- Megatron GPTDataset over the written prefixes -----------------------------------------


def test_gpt_dataset_builds_over_the_prefixes(corpus, tokenizer, tmp_path):
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    result = preprocess(corpus.train, tmp_path / "s", tokenizer, held_out_inputs=corpus.valid,
                        progress=False)
    config = GPTDatasetConfig(
        random_seed=1234,
        sequence_length=32,
        blend_per_split=[([result.train.prefix], None), ([result.valid.prefix], None), None],
        path_to_cache=str(tmp_path / "cache"),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        tokenizer=tokenizer,
    )
    assert not torch.distributed.is_initialized()
    train, valid, test = BlendedMegatronDatasetBuilder(
        GPTDataset, [64, None, None], lambda: True, config
    ).build()
    assert test is None and len(train) >= 64 and len(valid) > 0
    stream = numpy.concatenate(_read_docs(result.train.prefix)[0]).astype(numpy.int32).tobytes()
    for index in (0, 7, len(train) - 1):
        sample = train[index]
        assert sample["tokens"].shape == (32,) and sample["loss_mask"].all()
        assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
        window = torch.cat([sample["tokens"], sample["labels"][-1:]]).tolist()
        # Documents are shuffled, so check each piece of the window up to and including an EOD.
        cuts = [0] + [i + 1 for i, t in enumerate(window) if t == tokenizer.eod] + [len(window)]
        for piece in (window[a:b] for a, b in zip(cuts, cuts[1:]) if b > a):
            assert _aligned_find(stream, numpy.asarray(piece, numpy.int32).tobytes()), piece
    assert os.listdir(tmp_path / "cache")  # indices were cached


def test_corpus_extra_roots_add_files_not_copies(tmp_path):
    lib, extra = tmp_path / "lib", tmp_path / "site"
    (lib / "pkg").mkdir(parents=True)
    (extra / "vendored").mkdir(parents=True)
    (lib / "a.py").write_text("a = 1\n")
    (lib / "pkg" / "b.py").write_text("b = 2\n")
    (extra / "vendored" / "a_copy.py").write_text("a = 1\n")  # the same content as lib/a.py
    (extra / "c.py").write_text("c = 3\n")
    (extra / "tests").mkdir()
    (extra / "tests" / "t.py").write_text("t = 4\n")  # test packages are left out, as in lib
    corpus = build_stdlib_corpus(root=lib, extra_roots=[extra])
    assert sorted(map(str, corpus.train + corpus.valid)) == sorted(
        str(p) for p in (lib / "a.py", lib / "pkg" / "b.py", (extra / "c.py").resolve()))
    assert corpus.train_bytes + corpus.valid_bytes == 18
    assert build_stdlib_corpus(root=lib) == build_stdlib_corpus(root=lib, extra_roots=[])
