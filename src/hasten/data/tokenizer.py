"""Tokenizers: raw bytes, a byte-level BPE trained on the train split, or a Hugging Face tokenizer folder.

All of them share one small interface (`Tokenizer`), can `save` themselves into a folder and be
rebuilt from it by `load_tokenizer`, so that a run folder carries the exact tokenizer its model was
trained with. A trained BPE is cached by a hash of what it was trained on, so reruns do not retrain.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from hasten.config import ConfigError, DataConfig
from hasten.data._files import publish_folder
from hasten.data.sources import Document

log = logging.getLogger(__name__)

EOT_TOKEN = "<|endoftext|>"
_EOT_FALLBACKS = (EOT_TOKEN, "</s>", "<eos>")
_META_FILE = "hasten_tokenizer.json"


class Tokenizer:
    """What the rest of hasten needs from a tokenizer; subclasses fill in the encoding."""

    name: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def save(self, folder: str | Path) -> None:
        """Write what `load_tokenizer(folder)` needs to rebuild this tokenizer."""
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        """Identity of the tokenizer: two tokenizers with equal fingerprints encode identically."""
        return f"{self.name}:{self.vocab_size}"

    def _write_meta(self, folder: Path, kind: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"kind": kind, "name": self.name, "vocab_size": self.vocab_size, "eot_id": self.eot_id}
        (folder / _META_FILE).write_text(json.dumps(meta, indent=2))


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens (ids 0..255) plus an end-of-text token 256: no training, no unknowns."""

    name = "byte"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="replace"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def save(self, folder: str | Path) -> None:
        self._write_meta(Path(folder), "byte")


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (trained here, or read from a tokenizer.json) with a known eot id."""

    def __init__(self, tok: tokenizers.Tokenizer, eot_id: int, name: str) -> None:
        self.tok = tok
        self.tok.encode_special_tokens = True  # text spelling "<|endoftext|>" is text: only we insert eot
        self.eot_id = eot_id
        self.name = name
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self._fingerprint = hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode in parallel (Rust threads); without offsets, which we never use."""
        return [e.ids for e in self.tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    @property
    def fingerprint(self) -> str:
        return f"{self.name}:{self.vocab_size}:{self._fingerprint}"

    def save(self, folder: str | Path) -> None:
        """tokenizer.json + tokenizer_config.json (a folder Hugging Face tools can read too) + hasten's meta."""
        folder = Path(folder)
        self._write_meta(folder, "hf")
        self.tok.save(str(folder / "tokenizer.json"))
        eot = self.tok.id_to_token(self.eot_id)
        (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": eot}, indent=2))

    @classmethod
    def from_folder(cls, folder: str | Path, name: str | None = None) -> HFTokenizer:
        """Read a folder holding tokenizer.json; eot from tokenizer_config.json's eos_token or a usual name."""
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise ConfigError(f"Tokenizer folder {folder} has no tokenizer.json; point data.tokenizer at a folder "
                              "that holds one, or use 'byte' or 'bpe'.")
        tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        return cls(tok, _find_eot(tok, folder), name or folder.resolve().name)


def _find_eot(tok: tokenizers.Tokenizer, folder: Path) -> int:
    """The end-of-text id: tokenizer_config.json's eos_token, else the first usual eot token in the vocab."""
    candidates = list(_EOT_FALLBACKS)
    config = folder / "tokenizer_config.json"
    if config.is_file():
        eos = json.loads(config.read_text()).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str):
            candidates.insert(0, eos)
    for token in candidates:
        if (token_id := tok.token_to_id(token)) is not None:
            return token_id
    raise ConfigError(f"Tokenizer in {folder} has no end-of-text token; set eos_token in its tokenizer_config.json "
                      f"or add one of {', '.join(_EOT_FALLBACKS)}.")


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """Rebuild a tokenizer written by `Tokenizer.save` (or read any folder holding tokenizer.json)."""
    folder = Path(folder)
    meta_path = folder / _META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {"kind": "hf"}
    if meta["kind"] == "byte":
        return ByteTokenizer()
    return HFTokenizer.from_folder(folder, meta.get("name"))


def train_bpe(docs: Sequence[Document], vocab_size: int) -> HFTokenizer:
    """Train a byte-level BPE (GPT-2 style) on the documents; any text encodes and decodes back exactly."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((d.text for d in docs), trainer=trainer, length=len(docs))
    return HFTokenizer(tok, tok.token_to_id(EOT_TOKEN), f"bpe{vocab_size}")


def documents_hash(docs: Sequence[Document]) -> str:
    """A hash of the documents' names and contents, in order."""
    h = hashlib.sha256()
    for doc in docs:
        h.update(doc.name.encode("utf-8", errors="replace") + b"\0")
        h.update(hashlib.sha256(doc.text.encode("utf-8", errors="replace")).digest())
    return h.hexdigest()


def cached_bpe(docs: Sequence[Document], vocab_size: int, cache_dir: Path) -> HFTokenizer:
    """A BPE trained on `docs`, loaded from `cache_dir` when the same training was done before."""
    key = hashlib.sha256(f"{documents_hash(docs)}|{vocab_size}|{tokenizers.__version__}".encode()).hexdigest()
    folder = Path(cache_dir) / "tokenizers" / f"bpe{vocab_size}-{key[:16]}"
    if (folder / "tokenizer.json").is_file():
        log.info("loading cached BPE tokenizer from %s", folder)
        return HFTokenizer.from_folder(folder, f"bpe{vocab_size}")
    log.info("training a BPE tokenizer (vocab %d) on %d documents", vocab_size, len(docs))
    publish_folder(folder, train_bpe(docs, vocab_size).save)
    return HFTokenizer.from_folder(folder, f"bpe{vocab_size}")  # read back, so both paths fingerprint alike


def build_tokenizer(cfg: DataConfig, train_docs: Sequence[Document], cache_dir: Path) -> Tokenizer:
    """The tokenizer `cfg.tokenizer` names: 'byte', 'bpe' (trained on train_docs, cached) or a folder."""
    choice = cfg.tokenizer.strip()
    if choice == "byte":
        return ByteTokenizer()
    if choice == "bpe":
        return cached_bpe(train_docs, cfg.bpe_vocab_size, cache_dir)
    if Path(choice).expanduser().is_dir():
        return load_tokenizer(Path(choice).expanduser())  # a hasten run's tokenizer/ or any tokenizer.json folder
    raise ConfigError(f"data.tokenizer={cfg.tokenizer!r} is not allowed: choose 'byte', 'bpe', "
                      "or a folder holding tokenizer.json.")
