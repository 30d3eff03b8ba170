"""Byte-level BPE tokenizer for the demo corpora, and its Megatron-Core adapter.

Design choices:
  * One class, `HFTokenizer`, wraps a Hugging Face `tokenizers.Tokenizer` and is also a
    `megatron.core.tokenizers.MegatronTokenizerBase`, so the same object tokenizes the corpus in
    `preprocess` and goes into `GPTDatasetConfig(tokenizer=...)` and the trainer. Megatron's
    datasets read only `eod`, `pad`, `vocab_size` and `unique_identifiers` from it (the last
    one names the dataset-index cache, so it includes a hash of the tokenizer JSON: a retrained
    tokenizer never reuses a stale cache).
  * Lossless: byte-level pre-tokenizer with `add_prefix_space=False`, no normalizer, and a
    ByteLevel decoder, so `detokenize(tokenize(text)) == text` for any Python string that is
    valid Unicode (no lone surrogates), whitespace and `\\r\\n` included.
  * Special tokens are ids, never text: documents are encoded with `encode_special_tokens`
    on, so a literal "<|endoftext|>" inside a source file becomes ordinary bytes and cannot
    fake a document boundary; the end-of-document id is appended by `preprocess` only.
    Decoding keeps special tokens, so an appended EOD decodes back to "<|endoftext|>".
  * `train_bpe` puts the EOD token at id 0 and a distinct pad token at id 1 (the trainer adds
    special tokens first), so ids are stable across vocab sizes and the pad id never collides
    with EOD (Megatron warns and disables pad masking when they collide).
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterable

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers
from megatron.core.tokenizers import MegatronTokenizerBase

EOD_TOKEN = "<|endoftext|>"
"""End-of-document token appended after every document."""

PAD_TOKEN = "<|pad|>"
"""Padding token; only used by Megatron to mask padded labels."""

NO_PAD_ID = -1
"""`pad` when the tokenizer has no pad token: Megatron's own "never in the data" pad id."""


class HFTokenizer(MegatronTokenizerBase):
    """A `tokenizers.Tokenizer` with an end-of-document id, usable as a Megatron tokenizer.

    Args:
        tokenizer: the Hugging Face tokenizer to wrap (it is not copied).
        path: where it was loaded from or saved to; recorded in `unique_identifiers`.
        eod_token: the token string whose id is the end-of-document id; it must be in the vocab.
        pad_token: the padding token string; when absent from the vocab `pad` is -1.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        path: str | os.PathLike | None = None,
        eod_token: str = EOD_TOKEN,
        pad_token: str = PAD_TOKEN,
    ) -> None:
        super().__init__(str(path) if path is not None else "", {})
        eod_id = tokenizer.token_to_id(eod_token)
        if eod_id is None:
            raise ValueError(
                f"eod_token: {eod_token!r} is not in the tokenizer vocabulary"
                f"{f' of {path}' if path else ''}; pass the tokenizer's end-of-document token "
                "as eod_token, or train a tokenizer with train_bpe(), which adds it."
            )
        # Literal special-token text in a document is data, not a control id.
        tokenizer.encode_special_tokens = True
        self._tokenizer = tokenizer
        self._eod_id = eod_id
        self._eod_token = eod_token
        pad_id = tokenizer.token_to_id(pad_token)
        self._pad_id = NO_PAD_ID if pad_id is None else pad_id
        self._json_md5 = hashlib.md5(tokenizer.to_str().encode("utf-8")).hexdigest()

    # ----- construction and persistence -------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kwargs) -> "HFTokenizer":
        """Load a `tokenizer.json` (a file, or a directory that holds one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise ValueError(
                f"tokenizer: {str(path)!r} does not exist; point it at a tokenizer.json, or "
                "train one first with train_bpe(texts, vocab_size=..., save_path=...)."
            )
        try:
            loaded = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception for any unreadable file
            raise ValueError(
                f"tokenizer: {str(path)!r} is not a tokenizer.json the tokenizers library can read "
                f"({' '.join(str(err).split())[:200]}); point it at the tokenizer.json nemo-tst "
                "preprocess wrote (or used)"
            ) from None
        return cls(loaded, path=path, **kwargs)

    def fingerprint(self) -> str:
        """SHA-256 of the tokenizer's canonical JSON: equal for the same vocabulary, merges and
        special tokens, however the file was written."""
        import hashlib

        return hashlib.sha256(self.to_str().encode()).hexdigest()

    @classmethod
    def from_str(cls, json_str: str, **kwargs) -> "HFTokenizer":
        """Rebuild from `to_str()`; how worker processes receive the tokenizer."""
        return cls(tokenizers.Tokenizer.from_str(json_str), **kwargs)

    def to_str(self) -> str:
        """The tokenizer as a JSON string (the content of `tokenizer.json`)."""
        return self._tokenizer.to_str()

    def save(self, path: str | os.PathLike) -> Path:
        """Write `tokenizer.json` (into `path` if it is a directory) and return its path."""
        path = Path(path)
        if path.is_dir() or path.suffix != ".json":
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tokenizer.save(str(path))
        self.path = str(path)
        return path

    # ----- encoding ----------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens and without the EOD id."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens are kept, so the inverse of `tokenize` is exact."""
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    encode = tokenize
    decode = detokenize

    # ----- what Megatron reads -----------------------------------------------------------------

    @property
    def eod(self) -> int:
        """End-of-document id (Megatron's name)."""
        return self._eod_id

    @property
    def eod_id(self) -> int:
        """End-of-document id."""
        return self._eod_id

    @property
    def eod_token(self) -> str:
        """End-of-document token string."""
        return self._eod_token

    @property
    def pad(self) -> int:
        """Pad id, distinct from `eod`; -1 when the vocabulary has no pad token."""
        return self._pad_id

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the model's unpadded vocabulary)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def vocab(self) -> dict[str, int]:
        """Token string to id."""
        return self._tokenizer.get_vocab(with_added_tokens=True)

    @property
    def hf_tokenizer(self) -> tokenizers.Tokenizer:
        """The wrapped Hugging Face tokenizer."""
        return self._tokenizer

    @property
    def unique_identifiers(self) -> OrderedDict:
        """JSON-able identity; Megatron hashes it into the dataset-index cache file names."""
        return OrderedDict(
            [
                ("class", f"{type(self).__module__}.{type(self).__qualname__}"),
                ("tokenizer_json_md5", self._json_md5),
                ("vocab_size", self.vocab_size),
                ("eod_id", self._eod_id),
                ("pad_id", self._pad_id),
            ]
        )

    def apply_chat_template(self, *args, **kwargs):
        """Not supported: pretraining on raw text needs no chat template."""
        raise NotImplementedError("HFTokenizer is for raw-text pretraining: no chat template.")

    def __repr__(self) -> str:
        return (
            f"HFTokenizer(vocab_size={self.vocab_size}, eod={self.eod}, pad={self.pad}, "
            f"path={self.path!r})"
        )


def train_bpe(
    texts: Iterable[str],
    *,
    vocab_size: int,
    min_frequency: int = 2,
    save_path: str | os.PathLike | None = None,
    show_progress: bool = False,
) -> HFTokenizer:
    """Train a lossless byte-level BPE on `texts` (one string per document).

    Args:
        texts: the training documents; any iterable, consumed once.
        vocab_size: final vocabulary size, the 256 byte symbols and the two special tokens
            included.
        min_frequency: a pair must occur this often to be merged.
        save_path: if given, the `tokenizer.json` file (or a directory for it) to write.
        show_progress: let the Rust trainer draw its own progress bar.
    """
    minimum = len(pre_tokenizers.ByteLevel.alphabet()) + 2
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size: {vocab_size} cannot hold the 256 byte symbols and the EOD/pad tokens; "
            f"use vocab_size >= {minimum}."
        )
    if min_frequency < 1:
        raise ValueError(f"min_frequency: {min_frequency} must be >= 1.")
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOD_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = HFTokenizer(tokenizer)
    assert (wrapped.eod, wrapped.pad) == (0, 1), "special tokens must come first in the vocab"
    if save_path is not None:
        wrapped.save(save_path)
    return wrapped
