"""`nemo_tst.demo.data`: corpus -> BPE -> indexed datasets once per directory, and the overrides
that point a recipe at them."""

import json
from pathlib import Path

import pytest

from nemo_tst.data import build_stdlib_corpus
from nemo_tst.demo.data import data_overrides, prepare_data

DATA = {"tokenizer": "/d/tokenizer.json", "train_prefix": "/d/code_train", "valid_prefix": "/d/code_valid",
        "vocab_size": 300}


def test_data_overrides():
    assert data_overrides(DATA, data_dir=Path("/d"), cpu=True, run_dir=Path("/runs/a b"),
                          extra_args=["--data-cache-path", "/c"]) == [
        'data.prefix="/d/code"', 'data.tokenizer="/d/tokenizer.json"', "model.vocab_size=300",
        "data.num_workers=0", "cpu=true", "transformer_impl=local", 'run_dir="/runs/a b"',
        'extra_args=["--data-cache-path", "/c"]',
    ]
    mixed = dict(DATA, valid_prefix="/elsewhere/code_valid")
    with pytest.raises(ValueError, match=r"^/d/data.json: held-out data /elsewhere/code_valid is not "
                                         r"/d/code_valid; delete /d to prepare the data again$"):
        data_overrides(mixed, data_dir=Path("/d"), cpu=False, run_dir=Path("/r"), extra_args=[])


def test_prepare_data_once_per_directory(tmp_path):
    tree = tmp_path / "lib"
    tree.mkdir()
    for i in range(12):
        (tree / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i * i}\n" * 2000)
    built = []

    def corpus(where):
        built.append(where)
        return build_stdlib_corpus(where, root=tree, valid_fraction=0.25)

    said = []
    out = tmp_path / "data"
    info = prepare_data(out, corpus, vocab_size=300, prefix="code", bpe_bytes=1, say=said.append)
    assert built == [out]
    assert info["train_prefix"] == str(out / "code_train") and info["valid_prefix"] == str(out / "code_valid")
    assert info["vocab_size"] <= 300 and info["train_tokens"] > info["valid_tokens"] > 0
    for prefix in (info["train_prefix"], info["valid_prefix"]):
        assert Path(prefix + ".bin").stat().st_size > 0 and Path(prefix + ".idx").is_file()
    files = build_stdlib_corpus(root=tree, valid_fraction=0.25)
    assert said[0].startswith(f"corpus: {files.train_bytes / 1e6:.1f} MB train ({len(files.train)} files), "
                              f"{files.valid_bytes / 1e6:.1f} MB held out ({len(files.valid)} files) (")
    one_file = files.train[0].stat().st_size  # bpe_bytes=1: the BPE reads the first file only
    assert f"{one_file / 1e6:.1f}" != f"{files.train_bytes / 1e6:.1f}"
    assert said[1].startswith(f"BPE (300) on {one_file / 1e6:.1f} MB: ")
    assert json.loads((out / "data.json").read_text()) == info

    assert prepare_data(out, corpus, vocab_size=300, prefix="code") == info  # read back, not rebuilt
    assert built == [out]
