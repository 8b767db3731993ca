"""The token cache: documents -> tokenizer -> two flat token files (train.bin, val.bin), done once.

An entry is named by a hash of everything that decides its contents (documents, split, tokenizer,
file format), is written into a temp folder and renamed into place, and is read back as read-only
memory maps. So a rerun with the same inputs opens the files in milliseconds instead of
re-tokenizing, and concurrent runs never see a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hasten.config import DataConfig
from hasten.data._files import publish_folder
from hasten.data.sources import Document, load_documents, split_documents
from hasten.data.tokenizer import Tokenizer, build_tokenizer, documents_hash

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_CHUNK_CHARS = 2_000_000  # text per encode_batch call: big enough to keep all cores busy, small in memory


@dataclass
class TokenData:
    """The tokens of a source, split by document, each document followed by the eot token."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer
    cache_path: Path
    num_documents: dict[str, int]


def cache_root(cfg: DataConfig) -> Path:
    """`cfg.cache_dir`, else $HASTEN_CACHE, else ~/.cache/hasten."""
    return Path(cfg.cache_dir or os.environ.get("HASTEN_CACHE") or Path.home() / ".cache" / "hasten").expanduser()


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype holding every id: uint16 up to 65536 tokens, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def cache_key(train: Sequence[Document], val: Sequence[Document], val_fraction: float, tokenizer: Tokenizer) -> str:
    """A hash of everything that decides the entry's contents."""
    parts = {"train": documents_hash(train), "val": documents_hash(val), "val_fraction": val_fraction,
             "tokenizer": tokenizer.fingerprint, "format": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def prepare_data(cfg: DataConfig) -> TokenData:
    """Load, split and tokenize `cfg.source`, reusing the cached token files when the inputs are unchanged."""
    train_docs, val_docs = split_documents(load_documents(cfg), cfg.val_fraction)
    root = cache_root(cfg)
    tokenizer = build_tokenizer(cfg, train_docs, root)
    key = cache_key(train_docs, val_docs, cfg.val_fraction, tokenizer)
    entry = root / "tokens" / f"{tokenizer.name}-{key[:20]}"
    if (entry / "meta.json").is_file():
        log.info("token cache hit: %s", entry)
    else:
        publish_folder(entry, lambda folder: write_entry(folder, train_docs, val_docs, tokenizer))
    return open_entry(entry, tokenizer)


def write_entry(folder: Path, train: Sequence[Document], val: Sequence[Document], tokenizer: Tokenizer) -> None:
    """Tokenize both splits into `folder` and describe them in meta.json (written last)."""
    start = time.perf_counter()
    dtype = token_dtype(tokenizer.vocab_size)
    tokens = {name: write_tokens(folder / f"{name}.bin", docs, tokenizer, dtype)
              for name, docs in (("train", train), ("val", val))}
    tokenizer.save(folder / "tokenizer")
    meta = {"format": FORMAT_VERSION, "dtype": dtype.name, "tokens": tokens,
            "documents": {"train": len(train), "val": len(val)},
            "tokenizer": {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id,
                          "fingerprint": tokenizer.fingerprint}}
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))
    elapsed = time.perf_counter() - start
    log.info("tokenized %d train / %d val tokens in %.1f s", tokens["train"], tokens["val"], elapsed)


def write_tokens(path: Path, docs: Sequence[Document], tokenizer: Tokenizer, dtype: np.dtype) -> int:
    """Encode the documents in batches, each followed by eot, appending to `path`; returns the token count."""
    count = 0
    with path.open("wb") as f:
        for chunk in _chunks(docs, _CHUNK_CHARS):
            ids = join_with_eot(tokenizer.encode_batch([d.text for d in chunk]), tokenizer.eot_id, dtype)
            f.write(ids.tobytes())
            count += ids.size
    return count


def _chunks(docs: Sequence[Document], max_chars: int) -> Iterator[Sequence[Document]]:
    """Consecutive runs of documents holding about `max_chars` characters each."""
    start, chars = 0, 0
    for i, doc in enumerate(docs):
        chars += len(doc.text)
        if chars >= max_chars:
            yield docs[start:i + 1]
            start, chars = i + 1, 0
    if start < len(docs):
        yield docs[start:]


def join_with_eot(ids: Sequence[Sequence[int]], eot_id: int, dtype: np.dtype) -> np.ndarray:
    """One flat array: each id list followed by `eot_id`."""
    out = np.empty(sum(len(x) for x in ids) + len(ids), dtype=dtype)
    pos = 0
    for x in ids:
        out[pos:pos + len(x)] = x
        out[pos + len(x)] = eot_id
        pos += len(x) + 1
    return out


def open_entry(entry: Path, tokenizer: Tokenizer) -> TokenData:
    """Read-only memory maps of a published entry."""
    meta = json.loads((entry / "meta.json").read_text())
    train, val = (np.memmap(entry / f"{name}.bin", dtype=meta["dtype"], mode="r") for name in ("train", "val"))
    return TokenData(train=train, val=val, tokenizer=tokenizer, cache_path=entry, num_documents=meta["documents"])


def unigram_cross_entropy(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of `val` under train's add-one-smoothed unigram distribution.

    This is what a model that ignores context entirely achieves: the baseline a language model must beat.
    """
    if max(int(train.max(initial=0)), int(val.max(initial=0))) >= vocab_size:
        raise ValueError(f"token ids reach beyond vocab_size={vocab_size}; pass the tokenizer's vocab_size.")
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64)
    log_p = np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)
    val_counts = np.bincount(val, minlength=vocab_size)
    return float(-(val_counts * log_p).sum() / max(val.size, 1))
