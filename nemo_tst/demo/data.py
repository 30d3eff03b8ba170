"""The data of a side-by-side comparison: corpus -> byte-level BPE -> Megatron indexed datasets.

`prepare_data` is done once per directory: `data.json` records what it built, and a rerun
reads it back instead of building again. Its result is what `data_overrides` turns into a
recipe's data settings.
"""

import json
import time
from pathlib import Path
from typing import Callable, Optional

from nemo_tst.data.corpus import CorpusFiles

__all__ = ["data_overrides", "prepare_data", "prepare_stdlib_data"]


def prepare_data(out: Path, corpus: Callable[[Path], CorpusFiles], *, vocab_size: int, prefix: str,
                 workers: int = 1, bpe_bytes: Optional[int] = None,
                 say: Optional[Callable[[str], None]] = None) -> dict:
    """corpus(out) -> out/tokenizer.json -> out/<prefix>_train, out/<prefix>_valid; reused if present.

    `bpe_bytes`: train the BPE on the first training files up to this size (the corpus lists
    them in a stable order) rather than on all of them. `say` reports each step's size and time.
    """
    from nemo_tst.data import HFTokenizer, iter_texts, preprocess, train_bpe

    done = out / "data.json"
    if done.is_file():
        return json.loads(done.read_text())
    out.mkdir(parents=True, exist_ok=True)
    say = say or (lambda text: None)
    t0 = time.time()
    files = corpus(out)
    say(f"corpus: {files.train_bytes / 1e6:.1f} MB train ({len(files.train)} files), "
        f"{files.valid_bytes / 1e6:.1f} MB held out ({len(files.valid)} files) ({time.time() - t0:.0f}s)")
    sample, used = list(files.train), files.train_bytes
    if bpe_bytes is not None:
        sample, used = [], 0
        for path in files.train:
            if used >= bpe_bytes:
                break
            sample.append(path)
            used += path.stat().st_size
    t1 = time.time()
    tokenizer_path = out / "tokenizer.json"
    train_bpe(iter_texts(sample), vocab_size=vocab_size, save_path=tokenizer_path)
    tokenizer = HFTokenizer.from_file(tokenizer_path)
    say(f"BPE ({vocab_size}) on {used / 1e6:.1f} MB: {time.time() - t1:.0f}s")
    t2 = time.time()
    result = preprocess(
        list(files.train), str(out / prefix), tokenizer, held_out_inputs=list(files.valid),
        workers=workers, overwrite=True,
    )
    info = {
        "tokenizer": str(tokenizer_path),
        "train_prefix": result.train.prefix,
        "valid_prefix": result.valid.prefix,
        "train_tokens": result.train.tokens,
        "valid_tokens": result.valid.tokens,
        "vocab_size": tokenizer.vocab_size,
    }
    say(f"preprocessed {info['train_tokens']:,} train / {info['valid_tokens']:,} held-out tokens "
        f"({time.time() - t2:.0f}s)")
    done.write_text(json.dumps(info, indent=2))
    return info


def prepare_stdlib_data(out: Path, *, max_bytes, vocab_size: int, workers: int = 1) -> dict:
    """The demo's data: the standard library's sources (`build_stdlib_corpus`), at most
    `max_bytes` of them, as out/stdlib_train and out/stdlib_valid."""
    from nemo_tst.data import build_stdlib_corpus

    return prepare_data(out, lambda where: build_stdlib_corpus(where, max_bytes=max_bytes),
                        vocab_size=vocab_size, prefix="stdlib", workers=workers)


def _quoted(value) -> str:
    """An override value read back as this exact string (a path may hold YAML syntax)."""
    return json.dumps(str(value))


def data_overrides(data: dict, *, data_dir: Path, cpu: bool, run_dir: Path,
                   extra_args: list[str]) -> list[str]:
    """The recipe overrides that point one run at `prepare_data`'s result, on this device, in
    `run_dir`; `extra_args` are Megatron options the recipe has no field for."""
    prefix = data["train_prefix"].removesuffix("_train")
    if data["valid_prefix"] != f"{prefix}_valid":
        raise ValueError(f"{data_dir / 'data.json'}: held-out data {data['valid_prefix']} is not "
                         f"{prefix}_valid; delete {data_dir} to prepare the data again")
    return [
        f"data.prefix={_quoted(prefix)}", f"data.tokenizer={_quoted(data['tokenizer'])}",
        f"model.vocab_size={data['vocab_size']}",  # the BPE trained may hold fewer tokens than asked
        "data.num_workers=0",  # small data: no loader worker processes to start
        f"cpu={'true' if cpu else 'false'}",
        "transformer_impl=local",  # a pip install has no Transformer Engine: plain PyTorch layers
        f"run_dir={_quoted(run_dir)}",
        f"extra_args={json.dumps(extra_args)}",
    ]
