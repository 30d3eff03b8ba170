"""What a preprocessed dataset is and which tokenizer made it, checked before training.

`nemo-tst preprocess` writes, beside each PREFIX.bin/.idx, PREFIX.tst.json: the fingerprint
of the tokenizer it encoded with (the SHA-256 of its canonical JSON), its vocabulary size and
the largest token id in the data. `nemo-tst pretrain` reads it to refuse, before launch, a
tokenizer that is not the data's and a model vocabulary that does not cover the data's ids.
`index_problem` reads an index's header, so a damaged .idx is named, not a crash in
Megatron's reader.
"""

import json
import os
import struct
from pathlib import Path
from typing import Optional

__all__ = ["SIDECAR", "index_problem", "read_provenance", "write_provenance"]

SIDECAR = ".tst.json"
_INDEX_HEADER = b"MMIDIDX\x00\x00"  # Megatron's indexed-dataset index format, version 1
_HEADER_BYTES = len(_INDEX_HEADER) + 8 + 1 + 8 + 8  # header, version, dtype code, 2 counts
_ITEM_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 8, 8: 2}  # Megatron's DType codes


def index_problem(prefix: str) -> Optional[str]:
    """Why PREFIX.bin/.idx is not a complete Megatron indexed dataset, or None."""
    idx, bin_ = Path(prefix + ".idx"), Path(prefix + ".bin")
    for path in (idx, bin_):
        if not path.is_file():
            return f"{path} does not exist"
    size = idx.stat().st_size
    try:
        with open(idx, "rb") as f:
            head = f.read(_HEADER_BYTES)
            if len(head) < _HEADER_BYTES or head[: len(_INDEX_HEADER)] != _INDEX_HEADER:
                return f"{idx} is not a Megatron index (bad or short header)"
            code = head[len(_INDEX_HEADER) + 8]
            sequences, documents = struct.unpack("<QQ", head[-16:])
            if code not in _ITEM_BYTES:
                return f"{idx} names an unknown token type (code {code})"
            if size < _HEADER_BYTES + 12 * sequences + 8 * documents:
                return (f"{idx} is truncated ({size:,} bytes for {sequences:,} sequences and "
                        f"{documents:,} documents)")
            import numpy

            lengths = numpy.fromfile(f, dtype=numpy.int32, count=sequences)
    except OSError as err:
        return f"{idx} cannot be read ({err})"
    needed = int(lengths.astype(numpy.int64).sum()) * _ITEM_BYTES[code]
    if bin_.stat().st_size < needed:
        return f"{bin_} is truncated ({bin_.stat().st_size:,} of {needed:,} bytes)"
    return None


def write_provenance(prefix: str, tokenizer, *, max_token_id: int, tokens: int, documents: int) -> Path:
    """PREFIX.tst.json: the tokenizer that made PREFIX and what the data holds."""
    path = Path(prefix + SIDECAR)
    record = {
        "tokenizer": str(getattr(tokenizer, "path", None) or ""),
        "tokenizer_sha256": tokenizer.fingerprint(),
        "vocab_size": tokenizer.vocab_size,
        "max_token_id": int(max_token_id),
        "tokens": int(tokens),
        "documents": int(documents),
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)
    return path


def read_provenance(prefix: str) -> Optional[dict]:
    """PREFIX.tst.json, or None for data not written by `nemo-tst preprocess` (or by an older
    one); a sidecar that does not parse is an error naming it."""
    path = Path(prefix + SIDECAR)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not JSON ({err}); rerun nemo-tst preprocess for {prefix}") from None
