"""Data for the demos: a lossless byte-level BPE, Megatron indexed datasets, the stdlib corpus.

    tokenizer   `HFTokenizer` (a Megatron tokenizer around Hugging Face `tokenizers`), `train_bpe`
    corpus      input paths -> documents; the Python stdlib as a default train/valid corpus
    preprocess  documents -> `<prefix>_train` / `<prefix>_valid` `.bin` + `.idx`, multiprocess
"""

from nemo_tst.data.corpus import (
    DEFAULT_EXTENSIONS,
    CorpusFiles,
    Document,
    build_stdlib_corpus,
    iter_documents,
    iter_texts,
    read_text,
    site_packages_roots,
    stdlib_root,
)
from nemo_tst.data.preprocess import PreprocessResult, Progress, SplitStats, preprocess
from nemo_tst.data.tokenizer import EOD_TOKEN, PAD_TOKEN, HFTokenizer, train_bpe

__all__ = [
    "DEFAULT_EXTENSIONS",
    "EOD_TOKEN",
    "PAD_TOKEN",
    "CorpusFiles",
    "Document",
    "HFTokenizer",
    "PreprocessResult",
    "Progress",
    "SplitStats",
    "build_stdlib_corpus",
    "iter_documents",
    "iter_texts",
    "preprocess",
    "read_text",
    "site_packages_roots",
    "stdlib_root",
    "train_bpe",
]
