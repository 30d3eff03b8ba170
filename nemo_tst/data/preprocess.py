"""Turn text files, directories and JSONL files into Megatron indexed datasets (.bin + .idx).

Design choices:
  * What a document is (a file, or a JSONL record) is `corpus.iter_documents`' business;
    zero-length documents are skipped and counted.
  * One Megatron sequence per document (`add_item` then `end_document`), the EOD id appended,
    token dtype from `DType.optimal_dtype(vocab_size)` (uint16 below 65500 ids).
  * Two prefixes: `<output_prefix>_train` and, when something is held out,
    `<output_prefix>_valid`. The held-out set is either explicit (`held_out_inputs`, e.g. the
    stdlib corpus' validation files) or `held_out_fraction` of the documents picked with
    `numpy.random.default_rng(seed)`; both are by document, never by token.
  * Encoding runs in a `multiprocessing.Pool` with ordered `imap`, so the bytes written do not
    depend on `workers`. Workers get the tokenizer as its JSON string and read files
    themselves; the parent only routes arrays to the two builders.
  * Outputs are written to `*.tmp` files and renamed at the end: an interrupted run never
    leaves a prefix that looks complete. Existing prefixes are kept unless `overwrite=True`.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Iterable, Sequence, TextIO

import numpy
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from nemo_tst.data.corpus import (
    DEFAULT_EXTENSIONS,
    Document,
    PathLike,
    is_empty,
    iter_documents,
    normalize_extensions,
    read_text,
)
from nemo_tst.data.provenance import SIDECAR, write_provenance
from nemo_tst.data.tokenizer import HFTokenizer


@dataclass(frozen=True, kw_only=True)
class SplitStats:
    """One written split."""

    prefix: str
    """Path prefix of the `.bin`/`.idx` pair, as Megatron's `blend` expects it."""
    documents: int
    """Documents written (zero-length ones are skipped)."""
    tokens: int
    """Tokens written, EOD ids included."""


@dataclass(frozen=True, kw_only=True)
class PreprocessResult:
    """What `preprocess` wrote."""

    train: SplitStats
    valid: SplitStats | None
    """None when nothing was held out."""
    vocab_size: int
    eod_id: int
    dtype: str
    """Numpy dtype name of the stored token ids."""
    empty_documents: int
    """Zero-length documents skipped."""


# ----- encoding (runs in the workers) -------------------------------------------------------

_WORKER: dict = {}


def _init_worker(tokenizer_json: str, eod_token: str, append_eod: bool, dtype_name: str) -> None:
    tokenizer = HFTokenizer.from_str(tokenizer_json, eod_token=eod_token)
    _WORKER.update(tokenizer=tokenizer, append_eod=append_eod, dtype=numpy.dtype(dtype_name))


def _encode(document: Document) -> numpy.ndarray:
    tokenizer: HFTokenizer = _WORKER["tokenizer"]
    ids = tokenizer.tokenize(read_text(document))
    if _WORKER["append_eod"]:
        ids.append(tokenizer.eod)
    return numpy.asarray(ids, dtype=_WORKER["dtype"])


# ----- progress --------------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on a tty; elsewhere a line per 10% so logs stay short."""

    def __init__(self, total: int, *, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total, self.done, self.tokens = max(total, 1), 0, 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.is_tty = enabled and getattr(self.stream, "isatty", lambda: False)()
        self.start = self.last_draw = time.monotonic()
        self.last_decile = -1

    def update(self, documents: int, tokens: int) -> None:
        self.done += documents
        self.tokens += tokens
        if not self.enabled:
            return
        now = time.monotonic()
        if self.is_tty:
            if now - self.last_draw >= 0.1 or self.done >= self.total:
                self.last_draw = now
                self._draw("\r", "")
        else:
            decile = 10 * self.done // self.total
            if decile > self.last_decile:
                self.last_decile = decile
                self._draw("", "\n")

    def close(self) -> None:
        if self.is_tty:
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, head: str, tail: str) -> None:
        fraction = min(self.done / self.total, 1.0)
        bar = "#" * int(30 * fraction) + "." * (30 - int(30 * fraction))
        rate = self.tokens / max(time.monotonic() - self.start, 1e-9)
        self.stream.write(
            f"{head}[{bar}] {100 * fraction:5.1f}% {self.done}/{self.total} docs "
            f"{self.tokens:,} tokens {rate:,.0f} tok/s{tail}"
        )
        self.stream.flush()


# ----- writing -------------------------------------------------------------------------------


def _start_pool(
    workers: int, init_args: tuple, start_method: str | None
) -> multiprocessing.pool.Pool:
    """A worker pool, forked by default: children then need no re-import of torch/Megatron.

    Python warns about fork() in a multi-threaded parent (megatron's import and a tokenizer
    trained in this process leave idle threads). The children only run `tokenizers` encoding
    with TOKENIZERS_PARALLELISM pinned to false (which also keeps `tokenizers` from printing its
    own fork warning), as Megatron's tools/preprocess_data.py does; that one warning is
    silenced. Pass start_method="spawn" to avoid fork altogether (each worker then imports
    nemo_tst, a few seconds).
    """
    if start_method is None:
        start_method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r".*multi-threaded, use of fork", DeprecationWarning)
            context = multiprocessing.get_context(start_method)
            return context.Pool(workers, initializer=_init_worker, initargs=init_args)
    finally:
        if saved is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved


def _collect(
    name: str, inputs: Sequence[PathLike], extensions: Iterable[str], text_field: str
) -> tuple[list[Document], int]:
    """The non-empty documents of `inputs` and how many empty ones were dropped."""
    documents = list(iter_documents(inputs, extensions=extensions, text_field=text_field))
    if not documents:
        raise ValueError(
            f"{name}: no documents found in {[os.fspath(p) for p in inputs]}; directories are "
            f"searched for {normalize_extensions(extensions)} (set extensions / --extensions)."
        )
    kept = [d for d in documents if not is_empty(d)]
    if not kept:
        raise ValueError(
            f"{name}: all {len(documents)} documents are empty; pass files or records with text."
        )
    return kept, len(documents) - len(kept)


def _check_free(prefix: str, overwrite: bool) -> None:
    for path in (prefix + ".bin", prefix + ".idx"):
        if os.path.exists(path) and not overwrite:
            raise ValueError(
                f"output_prefix: {path} already exists; pass overwrite=True (--overwrite) to "
                "replace it, or choose another output_prefix."
            )


def preprocess(
    inputs: Sequence[PathLike],
    output_prefix: PathLike,
    tokenizer: HFTokenizer | PathLike,
    *,
    held_out_inputs: Sequence[PathLike] | None = None,
    held_out_fraction: float = 0.0,
    seed: int = 0,
    workers: int = 1,
    append_eod: bool = True,
    text_field: str = "text",
    extensions: Iterable[str] = DEFAULT_EXTENSIONS,
    overwrite: bool = False,
    progress: bool = True,
    progress_stream: TextIO | None = None,
    start_method: str | None = None,
) -> PreprocessResult:
    """Tokenize `inputs` into `<output_prefix>_train` (+ `_valid`) Megatron indexed datasets.

    Args:
        inputs: text files, JSONL files and directories (walked for `extensions`).
        output_prefix: path prefix; `_train` / `_valid` and `.bin` / `.idx` are appended.
        tokenizer: an `HFTokenizer`, or the path of a `tokenizer.json`.
        held_out_inputs: documents for the validation split, given explicitly.
        held_out_fraction: else, this fraction of the documents (at least one) is held out,
            chosen with `seed`; 0 writes no validation split.
        workers: encoding processes; the output is identical for any value.
        append_eod: append the EOD id after every document.
        text_field: the text field of JSONL records.
        extensions: file suffixes taken from directories.
        overwrite: replace existing output prefixes.
        progress: draw a progress bar on `progress_stream` (default stderr).
        start_method: multiprocessing start method for `workers > 1`; default fork where
            available, else spawn.
    """
    if not isinstance(tokenizer, HFTokenizer):
        tokenizer = HFTokenizer.from_file(tokenizer)
    if workers < 1:
        raise ValueError(f"workers: {workers} must be >= 1 (1 encodes in this process).")
    if not 0.0 <= held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction: {held_out_fraction} must be in [0, 1).")
    if held_out_inputs and held_out_fraction > 0:
        raise ValueError(
            "held_out_inputs and held_out_fraction both set; give the validation documents "
            "explicitly or as a fraction, not both."
        )
    prefix = os.fspath(output_prefix)
    train_prefix, valid_prefix = prefix + "_train", prefix + "_valid"

    train_docs, empty = _collect("inputs", inputs, extensions, text_field)
    valid_docs, empty_valid = [], 0
    if held_out_inputs:
        valid_docs, empty_valid = _collect(
            "held_out_inputs", held_out_inputs, extensions, text_field
        )
    if held_out_fraction > 0:
        if len(train_docs) < 2:
            raise ValueError(
                "held_out_fraction: needs at least 2 non-empty documents to hold one out; add "
                "inputs or set held_out_fraction=0."
            )
        count = min(max(round(held_out_fraction * len(train_docs)), 1), len(train_docs) - 1)
        picked = set(numpy.random.default_rng(seed).choice(len(train_docs), count, replace=False))
        valid_docs = [d for i, d in enumerate(train_docs) if i in picked]
        train_docs = [d for i, d in enumerate(train_docs) if i not in picked]
    prefixes = [train_prefix] + ([valid_prefix] if valid_docs else [])
    for p in (train_prefix, valid_prefix):
        _check_free(p, overwrite)

    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    init_args = (tokenizer.to_str(), tokenizer.eod_token, append_eod, numpy.dtype(dtype).name)
    jobs = [(0, d) for d in train_docs] + [(1, d) for d in valid_docs]
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    builders = [IndexedDatasetBuilder(p + ".bin.tmp", dtype=dtype) for p in prefixes]
    counts = [[0, 0, -1] for _ in prefixes]  # [documents, tokens, largest id] per split
    bar = Progress(len(jobs), stream=progress_stream, enabled=progress)
    pool = None
    try:
        if workers == 1:
            _init_worker(*init_args)
            encoded = map(_encode, (d for _, d in jobs))
        else:
            pool = _start_pool(workers, init_args, start_method)
            chunksize = max(1, min(64, len(jobs) // (8 * workers)))
            encoded = pool.imap(_encode, (d for _, d in jobs), chunksize=chunksize)
        for (split, _), ids in zip(jobs, encoded):
            assert ids.size == 0 or int(ids.max()) < tokenizer.vocab_size
            builders[split].add_item(torch.from_numpy(ids))
            builders[split].end_document()
            counts[split][0] += 1
            counts[split][1] += int(ids.size)
            if ids.size:
                counts[split][2] = max(counts[split][2], int(ids.max()))
            bar.update(1, int(ids.size))
        for p, builder in zip(prefixes, builders):
            builder.finalize(p + ".idx.tmp")
        for p, (documents, tokens, largest) in zip(prefixes, counts):
            os.replace(p + ".bin.tmp", p + ".bin")
            os.replace(p + ".idx.tmp", p + ".idx")
            write_provenance(p, tokenizer, max_token_id=largest, tokens=tokens, documents=documents)
        if not valid_docs:  # overwrite=True: no stale validation split next to a new train split
            for path in (valid_prefix + ".bin", valid_prefix + ".idx", valid_prefix + SIDECAR):
                if os.path.exists(path):
                    os.remove(path)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        for p, builder in zip(prefixes, builders):
            builder.data_file.close()
            for tmp in (p + ".bin.tmp", p + ".idx.tmp"):
                if os.path.exists(tmp):
                    os.remove(tmp)

    stats = [SplitStats(prefix=p, documents=c[0], tokens=c[1]) for p, c in zip(prefixes, counts)]
    return PreprocessResult(
        train=stats[0],
        valid=stats[1] if len(stats) > 1 else None,
        vocab_size=tokenizer.vocab_size,
        eod_id=tokenizer.eod,
        dtype=numpy.dtype(dtype).name,
        empty_documents=empty + empty_valid,
    )
