"""Where documents come from: input paths to documents, and the built-in stdlib corpus.

Design choices:
  * One document = one text file, or one JSONL record (its `text_field`). Directories are walked
    recursively in sorted order and yield the files whose suffix is in `extensions`; a `.jsonl`
    file found that way is read as records. Files are read as bytes and decoded as strict UTF-8,
    so `\\r\\n` and a trailing newline survive exactly. A `Document` of a file holds only its
    path, so worker processes read files themselves and the parent never holds the corpus.
  * The demo's default corpus is the Python standard library of the running interpreter: it is
    on every machine, needs no download, is real code, and ~12 MB without its tests. It is
    returned as file lists (nothing is copied) that `preprocess(inputs=..., held_out_inputs=...)`
    takes directly.
  * Its train/validation split is by file, from a salted hash of the path relative to the
    stdlib root: stable across machines and Python patch releases (a file keeps its side as
    other files come and go), independent of `max_bytes`, and disjoint by construction.
  * `max_bytes` (a CI-size demo) keeps a hash-ordered, i.e. spread-over-packages, subset of each
    split within its share of the budget, never fewer than one file per split.
  * `extra_roots` widens the corpus beyond the stdlib (the quality benchmark adds the
    site-packages directories, `site_packages_roots`). Installed packages vendor copies of each
    other's files, so a file from an extra root whose content was already seen is left out.
"""

from __future__ import annotations

import hashlib
import json
import os
import site
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

DEFAULT_EXTENSIONS = (".txt", ".md", ".py")
"""Suffixes of the files taken from input directories."""

SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
TEST_DIRS = frozenset({"test", "tests", "idle_test"})

PathLike = str | os.PathLike


# ----- input paths to documents ---------------------------------------------------------------


@dataclass(frozen=True)
class Document:
    """A document: `text` is None for a whole file, which is read when it is encoded."""

    source: str
    """File path, or `path:line` for a JSONL record; used in messages."""
    text: str | None = None


def normalize_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    """Accept ".py", "py" and "*.py" alike."""
    return tuple("." + e.lstrip("*").lstrip(".") for e in extensions)


def _jsonl_documents(path: Path, text_field: str) -> Iterator[Document]:
    with open(path, "rb") as stream:
        for line_no, raw in enumerate(stream, start=1):
            if not raw.strip():
                continue
            source = f"{path}:{line_no}"
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ValueError(f"inputs: {source} is not a JSON object ({error}); fix the line.")
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise ValueError(
                    f"text_field: {source} has no string field {text_field!r}; pass the name "
                    "of the record's text field as text_field (--text-field)."
                )
            yield Document(source, record[text_field])


def iter_documents(
    inputs: Sequence[PathLike],
    *,
    extensions: Iterable[str] = DEFAULT_EXTENSIONS,
    text_field: str = "text",
) -> Iterator[Document]:
    """Yield the documents of `inputs` in a deterministic order (inputs in order, dirs sorted)."""
    suffixes = normalize_extensions(extensions)
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise ValueError(
                f"inputs: {str(path)!r} does not exist; pass existing text/JSONL files or "
                "directories."
            )
        if path.is_dir():
            files = sorted(
                (p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes),
                key=lambda p: p.relative_to(path).as_posix(),
            )
        else:
            files = [path]
        for file in files:
            if file.suffix == ".jsonl":
                yield from _jsonl_documents(file, text_field)
            else:
                yield Document(str(file))


def read_text(document: Document) -> str:
    """The document's text; files are decoded as strict UTF-8 with newlines untouched."""
    if document.text is not None:
        return document.text
    try:
        return Path(document.source).read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"inputs: {document.source} is not UTF-8 text ({error.reason} at byte "
            f"{error.start}); re-encode it as UTF-8 or leave it out of inputs."
        ) from None


def is_empty(document: Document) -> bool:
    """True for a zero-length document (whitespace-only text is kept)."""
    if document.text is not None:
        return document.text == ""
    return os.path.getsize(document.source) == 0


def iter_texts(inputs: Sequence[PathLike], **kwargs) -> Iterator[str]:
    """The non-empty texts of `iter_documents(inputs, **kwargs)`, e.g. to train a tokenizer on."""
    for document in iter_documents(inputs, **kwargs):
        if not is_empty(document):
            yield read_text(document)


# ----- the stdlib corpus ------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class CorpusFiles:
    """A corpus split by file; `train` and `valid` are disjoint and sorted by relative path."""

    root: Path
    train: tuple[Path, ...]
    valid: tuple[Path, ...]
    train_bytes: int
    valid_bytes: int


def stdlib_root() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def site_packages_roots() -> list[Path]:
    """Every site-packages / dist-packages directory of this interpreter, once each."""
    candidates = [*site.getsitepackages()]
    candidates += [p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages"))]
    roots, seen = [], {os.path.realpath(stdlib_root())}
    for candidate in candidates:
        real = os.path.realpath(candidate)
        if os.path.isdir(real) and real not in seen:
            seen.add(real)
            roots.append(Path(real))
    return roots


def _unit_hash(*parts: object) -> float:
    """A stable number in [0, 1) (Python's `hash` is salted per process)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _stdlib_files(root: Path, include_tests: bool, seen: set | None = None) -> dict[str, int]:
    """Relative posix path -> size of every non-empty UTF-8 `*.py` file under `root`. With
    `seen` (content digests, updated), a file whose content is in it is left out."""
    skipped = SKIPPED_DIRS | (frozenset() if include_tests else TEST_DIRS)
    files = {}
    for directory, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skipped and not d.startswith("."))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = Path(directory, name)
            data = path.read_bytes()
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if not data:
                continue
            if seen is not None:
                digest = hashlib.sha1(data).digest()
                if digest in seen:
                    continue
                seen.add(digest)
            files[path.relative_to(root).as_posix()] = len(data)
    return files


def _cap(names: list[str], sizes: dict[str, int], budget: float, seed: int) -> list[str]:
    """A hash-ordered subset of `names` within `budget` bytes; at least the smallest file."""
    kept, used = [], 0
    for name in sorted(names, key=lambda n: _unit_hash(seed, "order", n)):
        if used + sizes[name] <= budget:
            kept.append(name)
            used += sizes[name]
    return kept or [min(names, key=lambda n: (sizes[n], n))]


def build_stdlib_corpus(
    out_dir: PathLike | None = None,
    *,
    max_bytes: int | None = None,
    valid_fraction: float = 0.05,
    include_tests: bool = False,
    seed: int = 0,
    root: PathLike | None = None,
    extra_roots: Sequence[PathLike] = (),
) -> CorpusFiles:
    """Split the stdlib's `*.py` files into train/validation file lists.

    Args:
        out_dir: if given, `stdlib_corpus.json` (root, Python version, both file lists) is
            written there, recording exactly which files a run used.
        max_bytes: cap on the total size of the selected files; None keeps all of them.
        valid_fraction: share of the files (and of `max_bytes`) that goes to validation.
        include_tests: also take the stdlib's own test packages (~20 MB more).
        seed: salts the split and the capped selection.
        root: the library directory; defaults to `stdlib_root()` (tests pass a small tree).
        extra_roots: more library directories (e.g. `site_packages_roots()`); their files
            are named by absolute path, and left out where their content is already taken.
    """
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction: {valid_fraction} must be in (0, 1).")
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes: {max_bytes} must be positive, or None for no cap.")
    root = Path(root) if root is not None else stdlib_root()
    sizes = _stdlib_files(root, include_tests)
    if extra_roots:
        seen = {hashlib.sha1((root / name).read_bytes()).digest() for name in sizes}
        for extra in extra_roots:
            extra = Path(extra).resolve()
            sizes |= {(extra / name).as_posix(): size
                      for name, size in _stdlib_files(extra, include_tests, seen).items()}
    if len(sizes) < 2:
        raise ValueError(
            f"root: {str(root)!r} holds {len(sizes)} non-empty UTF-8 *.py files, fewer than the "
            "2 a train/validation split needs; point root at a Python library directory."
        )
    names = sorted(sizes)
    valid = [n for n in names if _unit_hash(seed, "split", n) < valid_fraction]
    if not valid:  # tiny trees: the lowest hash goes to validation
        valid = [min(names, key=lambda n: _unit_hash(seed, "split", n))]
    held_out = set(valid)
    train = [n for n in names if n not in held_out]
    if max_bytes is not None:
        train = _cap(train, sizes, max_bytes * (1.0 - valid_fraction), seed)
        valid = _cap(valid, sizes, max_bytes * valid_fraction, seed)
    corpus = CorpusFiles(
        root=root,
        train=tuple(root / n for n in sorted(train)),
        valid=tuple(root / n for n in sorted(valid)),
        train_bytes=sum(sizes[n] for n in train),
        valid_bytes=sum(sizes[n] for n in valid),
    )
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        manifest = {
            "root": str(root),
            "python": sys.version.split()[0],
            "seed": seed,
            "max_bytes": max_bytes,
            "train_bytes": corpus.train_bytes,
            "valid_bytes": corpus.valid_bytes,
            "train": sorted(train),
            "valid": sorted(valid),
        }
        with open(Path(out_dir, "stdlib_corpus.json"), "w", encoding="utf-8") as stream:
            json.dump(manifest, stream, indent=1)
    return corpus
