"""`nemo-tst preprocess`: text, directories or JSONL -> Megatron indexed datasets.

    nemo-tst preprocess --input DIR_OR_FILE [...] --output-prefix data/corpus \
        (--tokenizer tokenizer.json | --train-tokenizer --vocab-size 16384) \
        [--held-out-fraction 0.01 | --held-out-input PATH ...] [--workers 8]

Writes data/corpus_train.{bin,idx} (and _valid) and, with --train-tokenizer, the trained
tokenizer.json beside them; pass that to training as --tst-tokenizer.
"""

import argparse
import sys
from pathlib import Path

from nemo_tst.data.corpus import DEFAULT_EXTENSIONS, iter_texts
from nemo_tst.data.preprocess import preprocess
from nemo_tst.data.tokenizer import HFTokenizer, train_bpe
from nemo_tst.errors import ArgumentParser, fraction, positive_int, user_paths

__all__ = ["preprocess_main"]


def preprocess_main(argv: list[str]) -> None:
    parser = ArgumentParser(prog="nemo-tst preprocess", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, type=Path,
                        help="Text files, JSONL files (one 'text' per line) or directories.")
    parser.add_argument("--output-prefix", required=True, type=Path)
    tok = parser.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", type=Path, help="An existing Hugging Face tokenizer.json.")
    tok.add_argument("--train-tokenizer", action="store_true",
                     help="Train a byte-level BPE on the training inputs.")
    parser.add_argument("--vocab-size", type=positive_int, default=None,
                        help="Vocabulary of the trained tokenizer (with --train-tokenizer).")
    parser.add_argument("--held-out-fraction", type=fraction(0, 1, low_open=False), default=0.0,
                        help="Fraction of the documents held out for validation, in [0, 1).")
    parser.add_argument("--held-out-input", nargs="+", type=Path, default=None,
                        help="Documents for the validation split (instead of a fraction).")
    parser.add_argument("--workers", type=positive_int, default=1)
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--extensions", nargs="+", default=list(DEFAULT_EXTENSIONS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    opts = parser.parse_args(argv)
    with user_paths({"--output-prefix": opts.output_prefix, "--input": opts.input,
                     "--held-out-input": opts.held_out_input, "--tokenizer": opts.tokenizer}):
        _preprocess(opts)


def _preprocess(opts: argparse.Namespace) -> None:
    tokenizer_path = Path(f"{opts.output_prefix}_tokenizer.json")
    _check_before_work(opts, tokenizer_path)  # all of it, before a tokenizer is trained

    if opts.train_tokenizer:
        tokenizer_path.parent.mkdir(parents=True, exist_ok=True)
        texts = iter_texts(opts.input, text_field=opts.text_field, extensions=opts.extensions)
        tokenizer = train_bpe(texts, vocab_size=opts.vocab_size, save_path=tokenizer_path)
        print(f"trained tokenizer: {tokenizer_path} (vocab {tokenizer.vocab_size})", file=sys.stderr)
    else:
        tokenizer = HFTokenizer.from_file(opts.tokenizer)

    result = preprocess(
        opts.input, opts.output_prefix, tokenizer,
        held_out_inputs=opts.held_out_input, held_out_fraction=opts.held_out_fraction,
        seed=opts.seed, workers=opts.workers, text_field=opts.text_field,
        extensions=opts.extensions, overwrite=opts.overwrite,
    )
    print(f"train: {result.train.prefix} ({result.train.documents:,} documents, "
          f"{result.train.tokens:,} tokens)")
    if result.valid is not None:
        print(f"valid: {result.valid.prefix} ({result.valid.documents:,} documents, "
              f"{result.valid.tokens:,} tokens)")
    print(f"vocab size {result.vocab_size}, end-of-document id {result.eod_id}")


def _check_before_work(opts, tokenizer_path: Path) -> None:
    """Every argument, before any tokenizer is trained or file written; errors name the flag."""
    for flag, paths in (("--input", opts.input), ("--held-out-input", opts.held_out_input or [])):
        for path in paths:
            if not path.exists():
                raise ValueError(f"{flag} {path} does not exist")
    if opts.held_out_input and opts.held_out_fraction > 0:
        raise ValueError("--held-out-input and --held-out-fraction both choose the validation "
                         "documents; give one of them")
    if opts.train_tokenizer:
        if not opts.vocab_size or opts.vocab_size < 258:
            raise ValueError("--train-tokenizer needs --vocab-size of at least 258 (256 bytes + "
                             "the end-of-document and padding tokens)")
    else:
        if opts.vocab_size is not None:
            raise ValueError("--vocab-size applies only with --train-tokenizer")
        HFTokenizer.from_file(opts.tokenizer)  # exists and reads
    outputs = [Path(f"{opts.output_prefix}_{split}{suffix}") for split in ("train", "valid")
               for suffix in (".bin", ".idx")]
    if opts.train_tokenizer:
        outputs.append(tokenizer_path)
    existing = [str(p) for p in outputs if p.exists()]
    if existing and not opts.overwrite:
        raise ValueError(f"--output-prefix {opts.output_prefix}: {existing[0]} exists; pass "
                         "--overwrite to replace it, or choose another --output-prefix")
    if opts.output_prefix.is_dir():
        raise ValueError(f"--output-prefix {opts.output_prefix} is a directory; give a file prefix "
                         f"inside it, e.g. {opts.output_prefix / 'corpus'}")
