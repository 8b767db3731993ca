"""Where the text comes from: a list of named documents, and a train/val split by document.

Every source becomes a list of `Document(name, text)` sorted by name, so that the same inputs give
the same list, in the same order, on every machine. The split is decided per document by a hash of
its name, so a file never leaks half into train and half into val, and adding a document never moves
another one across the split.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

from hasten.config import ConfigError, DataConfig

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_SNIFF_BYTES = 8192


class Document(NamedTuple):
    """One unit of text; `name` is stable across machines and decides the split."""

    name: str
    text: str


def name_hash(name: str) -> float:
    """A uniform number in [0, 1) from the name alone: the same on every machine and Python."""
    return int(hashlib.sha256(name.encode("utf-8")).hexdigest()[:8], 16) / 2**32


def load_documents(cfg: DataConfig) -> list[Document]:
    """The documents of `cfg.source`, sorted by name, limited to `cfg.max_documents`."""
    source = cfg.source.strip()
    if source == "stdlib":
        docs = list(_stdlib_documents())
    elif source.startswith("hf:"):
        docs = _hf_documents(source.removeprefix("hf:"), cfg.hf_split, cfg.text_field)
    else:
        docs = _path_documents(source, cfg.text_field)
    if not docs:
        raise ConfigError(f"data.source={cfg.source!r} holds no documents; point it at non-empty text or JSONL files.")
    return _limit(sorted(docs), cfg.max_documents)


def _limit(docs: list[Document], max_documents: int) -> list[Document]:
    """The first N documents in name-hash order (a subset spread over the whole tree), sorted by name."""
    if not max_documents or len(docs) <= max_documents:
        return docs
    chosen = sorted(docs, key=lambda d: (name_hash(d.name), d.name))[:max_documents]
    return sorted(chosen)


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, val) by a hash of each name; both sides get at least one document.

    A lone document (one text file, say a novel) is first cut into pieces of whole lines, so it can
    be split too; its pieces are named `name#0000`, `name#0001`, …
    """
    if len(docs) == 1:
        docs = split_lone_document(docs[0])
    if len(docs) < 2:
        raise ConfigError(f"The source has {len(docs)} document(s) with text but a split needs at least 2 "
                          "(or one of at least 2 lines); add text or files.")
    train = [d for d in docs if name_hash(d.name) >= val_fraction]
    val = [d for d in docs if name_hash(d.name) < val_fraction]
    if not val:
        first = min(train, key=lambda d: (name_hash(d.name), d.name))
        train, val = [d for d in train if d is not first], [first]
    elif not train:
        last = max(val, key=lambda d: (name_hash(d.name), d.name))
        train, val = [last], [d for d in val if d is not last]
    return train, val


def split_lone_document(doc: Document, pieces: int = 64) -> list[Document]:
    """Cut one document into up to `pieces` runs of whole lines (fewer for short texts)."""
    lines = doc.text.splitlines(keepends=True)
    per_piece = max(1, -(-len(lines) // pieces))
    chunks = ["".join(lines[i:i + per_piece]) for i in range(0, len(lines), per_piece)]
    return [Document(f"{doc.name}#{i:04d}", text) for i, text in enumerate(chunks)]


def stdlib_root() -> Path:
    """The folder of the running Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_documents() -> Iterator[Document]:
    """Every .py file of the standard library, without installed packages and bytecode caches."""
    root = stdlib_root()
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for file in sorted(files):
            if file.endswith(".py"):
                path = Path(folder, file)
                yield Document(path.relative_to(root).as_posix(), path.read_text("utf-8", errors="replace"))


def _path_documents(source: str, text_field: str) -> list[Document]:
    """Documents of a file, a folder (recursive) or a glob pattern."""
    path = Path(source).expanduser()
    if path.is_file():
        return list(_file_documents(path, path.name, text_field))
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))
        return _files_documents(((p, p.relative_to(path).as_posix()) for p in files), text_field)
    if glob.has_magic(source):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True) if os.path.isfile(p))
        return _files_documents(((p, p.as_posix()) for p in files), text_field)
    raise ConfigError(f"data.source={source!r} is not 'stdlib', 'hf:NAME', an existing file or folder, or a glob; "
                      "check the path.")


def _hidden(relative: Path) -> bool:
    """Files inside dot-folders (.git, .venv) or dot-files are not documents."""
    return any(part.startswith(".") for part in relative.parts)


def _files_documents(files: Iterable[tuple[Path, str]], text_field: str) -> list[Document]:
    """Documents of many files, skipping binary files (a folder often holds a stray image or archive)."""
    docs: list[Document] = []
    for path, name in files:
        if path.suffix == ".jsonl" or not _is_binary(path):
            docs.extend(_file_documents(path, name, text_field))
    return docs


def _is_binary(path: Path) -> bool:
    with path.open("rb") as f:
        return b"\0" in f.read(_SNIFF_BYTES)


def _file_documents(path: Path, name: str, text_field: str) -> Iterator[Document]:
    """One document per text file, or one per line of a .jsonl file (named `name:lineno`)."""
    if path.suffix != ".jsonl":
        yield Document(name, path.read_text("utf-8", errors="replace"))
        return
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield Document(f"{name}:{lineno}", _jsonl_text(line, path, lineno, text_field))


def _jsonl_text(line: str, path: Path, lineno: int, text_field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}:{lineno} is not valid JSON ({err.msg}); fix or remove that line.") from None
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise ConfigError(f"{path}:{lineno} has no string field {text_field!r}; "
                          "set data.text_field to the field that holds the text.")
    return record[text_field]


def _hf_documents(name: str, split: str, text_field: str) -> list[Document]:
    """Documents of a Hugging Face dataset split, named `NAME:index`."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"data.source='hf:{name}' needs the `datasets` package; "
                          "run `pip install datasets`.") from None
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as err:  # noqa: BLE001 - any loading failure is reported the same way to the user
        raise ConfigError(f"Could not load the Hugging Face dataset {name!r} (split {split!r}): {err}; "
                          "check the name and split, and note that this machine may be offline.") from None
    if text_field not in dataset.column_names:
        columns = ", ".join(dataset.column_names)
        raise ConfigError(f"The dataset {name!r} has no column {text_field!r} (it has {columns}); set data.text_field.")
    return [Document(f"{name}:{i:09d}", text) for i, text in enumerate(dataset[text_field])]
