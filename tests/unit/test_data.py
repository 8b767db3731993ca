"""Unit tests of hasten.data: sources, split, tokenizers, token cache, sampler, unigram baseline."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, trainers

import hasten.data.cache as cache_mod
import hasten.data.tokenizer as tok_mod
from hasten.config import ConfigError, DataConfig
from hasten.data import (ByteTokenizer, Document, HFTokenizer, WindowSampler, build_tokenizer, load_documents,
                         load_tokenizer, prepare_data, split_documents, unigram_cross_entropy)
from hasten.data.sources import name_hash

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    print(i * i)\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
    "# héllo wörld – ünïcode ✓ 日本語\nname = 'café'\n",
] * 4


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    for i, text in enumerate(CORPUS):
        (folder / ("sub" if i % 2 else "") / f"doc{i:02d}.py").write_text(text + f"# file {i}\n")
    return folder


def test_split_is_by_document_deterministic_and_never_empty() -> None:
    docs = [Document(f"d{i}", f"text {i}") for i in range(200)]
    train, val = split_documents(docs, 0.1)
    rev_train, rev_val = split_documents(list(reversed(docs)), 0.1)
    assert set(rev_val) == set(val) and set(rev_train) == set(train)  # membership depends on the name only
    assert sorted(train + val) == sorted(docs) and not set(train) & set(val)
    assert all(name_hash(d.name) < 0.1 for d in val) and 5 < len(val) < 40
    tiny_train, tiny_val = split_documents(docs[:2], 0.001)
    assert len(tiny_train) == 1 and len(tiny_val) == 1
    _, all_val = split_documents(docs[:3], 0.999)
    assert len(all_val) == 2
    with pytest.raises(ConfigError, match="at least 2"):
        split_documents(docs[:1], 0.1)  # one line cannot be split


def test_a_lone_text_is_cut_into_pieces_of_whole_lines() -> None:
    text = "".join(f"line {i}\n" for i in range(1000))
    train, val = split_documents([Document("novel.txt", text)], 0.1)
    pieces = sorted(train + val)
    assert len(pieces) == 63 and pieces[0].name == "novel.txt#0000"  # ceil(1000 / 64) = 16 lines each
    assert "".join(d.text for d in pieces) == text and val and train


def test_stdlib_source_is_deterministic_and_excludes_packages() -> None:
    cfg = DataConfig(source="stdlib", max_documents=50)
    docs = load_documents(cfg)
    assert len(docs) == 50 and docs == load_documents(cfg)
    assert [d.name for d in docs] == sorted(d.name for d in docs)
    assert all(d.name.endswith(".py") and not d.name.startswith("/") for d in docs)
    assert not any(part in d.name for d in docs for part in ("site-packages", "dist-packages", "__pycache__"))
    assert len({d.name.split("/")[0] for d in docs}) > 10  # the subset is spread over the tree
    assert sum(len(d.text) for d in docs) > 0


def test_text_jsonl_folder_and_glob_sources(tmp_path: Path, corpus_dir: Path) -> None:
    text = tmp_path / "one.txt"
    text.write_text("just one document")
    assert load_documents(DataConfig(source=str(text))) == [Document("one.txt", "just one document")]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"body": "first"}\n\n{"body": "second", "x": 1}\n')
    docs = load_documents(DataConfig(source=str(jsonl), text_field="body"))
    assert docs == [Document("docs.jsonl:1", "first"), Document("docs.jsonl:3", "second")]
    folder_docs = load_documents(DataConfig(source=str(corpus_dir)))
    assert len(folder_docs) == len(CORPUS) and "sub/doc01.py" in {d.name for d in folder_docs}
    glob_docs = load_documents(DataConfig(source=str(corpus_dir / "**" / "*.py")))
    assert sorted(d.text for d in glob_docs) == sorted(d.text for d in folder_docs)
    assert len(load_documents(DataConfig(source=str(corpus_dir), max_documents=5))) == 5


def test_folder_source_reads_jsonl_and_skips_binary(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n{"text": "y"}\n')
    (tmp_path / "b.txt").write_text("plain")
    (tmp_path / "c.bin").write_bytes(b"\x00\x01\x02")
    names = [d.name for d in load_documents(DataConfig(source=str(tmp_path)))]
    assert names == ["a.jsonl:1", "a.jsonl:2", "b.txt"]


def test_source_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nothing-here"):
        load_documents(DataConfig(source=str(tmp_path / "nothing-here.txt")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"content": "no text field"}\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl:2 .*'text'"):
        load_documents(DataConfig(source=str(bad)))
    bad.write_text("{not json\n")
    with pytest.raises(ConfigError, match=r"bad\.jsonl:1 is not valid JSON"):
        load_documents(DataConfig(source=str(bad)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no documents"):
        load_documents(DataConfig(source=str(tmp_path / "empty")))


def test_hf_source_without_datasets_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins
    real_import = builtins.__import__

    def no_datasets(name: str, *args, **kwargs):
        if name == "datasets":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(ConfigError, match="pip install datasets"):
        load_documents(DataConfig(source="hf:some/dataset"))


class _FakeDataset:
    column_names = ["text", "id"]

    def __getitem__(self, column: str) -> list[str]:
        return ["first doc", "second doc"]


def test_hf_source_loads_and_reports_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, split: _FakeDataset()
    monkeypatch.setitem(sys.modules, "datasets", fake)
    docs = load_documents(DataConfig(source="hf:org/set"))
    assert [d.text for d in docs] == ["first doc", "second doc"] and docs[0].name.startswith("org/set:")
    with pytest.raises(ConfigError, match="no column 'body'"):
        load_documents(DataConfig(source="hf:org/set", text_field="body"))

    def offline(name: str, split: str) -> None:
        raise ConnectionError("no route to host")

    fake.load_dataset = offline
    with pytest.raises(ConfigError, match="'org/set'.*offline"):
        load_documents(DataConfig(source="hf:org/set"))


def test_unknown_tokenizer_lists_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'byte', 'bpe'"):
        build_tokenizer(DataConfig(tokenizer="wordpiece"), [], tmp_path)
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        build_tokenizer(DataConfig(tokenizer=str(tmp_path)), [], tmp_path)


def test_byte_tokenizer_round_trip(tmp_path: Path) -> None:
    tok = ByteTokenizer()
    text = "héllo ✓ 日本語\n"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and tok.decode(ids + [tok.eot_id]) == text
    assert (tok.vocab_size, tok.eot_id) == (257, 256)
    assert tok.encode_batch(["a", "b"]) == [[97], [98]]
    assert tok.decode([0xE6]) == "\ufffd"  # a cut multi-byte character decodes, with a replacement mark
    tok.save(tmp_path / "t")
    assert isinstance(load_tokenizer(tmp_path / "t"), ByteTokenizer)


def test_bpe_trains_round_trips_saves_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = [Document(f"d{i}", t) for i, t in enumerate(CORPUS)]
    cfg = DataConfig(tokenizer="bpe", bpe_vocab_size=300)
    tok = build_tokenizer(cfg, docs, tmp_path)
    assert isinstance(tok, HFTokenizer) and 258 <= tok.vocab_size <= 300
    assert tok.decode([tok.eot_id]) == "" and tok.eot_id not in tok.encode("a<|endoftext|>b")  # only we insert eot
    for text in CORPUS + ["unseen ≠ text \t\x00 with 🎉 emoji", "a<|endoftext|>b"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(CORPUS[:3]) == [tok.encode(t) for t in CORPUS[:3]]
    tok.save(tmp_path / "saved")
    loaded = load_tokenizer(tmp_path / "saved")
    assert loaded.encode_batch(CORPUS) == tok.encode_batch(CORPUS)
    assert (loaded.eot_id, loaded.vocab_size, loaded.fingerprint) == (tok.eot_id, tok.vocab_size, tok.fingerprint)
    monkeypatch.setattr(tok_mod, "train_bpe", lambda *a: pytest.fail("the second build retrained"))
    again = build_tokenizer(cfg, docs, tmp_path)
    assert again.fingerprint == tok.fingerprint
    with pytest.raises(pytest.fail.Exception):  # other documents -> another cache entry -> training
        build_tokenizer(cfg, docs[:-1], tmp_path)


def _hf_folder(folder: Path, eos: object) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    if eos is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))
    return tok


@pytest.mark.parametrize("eos", [None, "<s>", {"content": "<s>", "special": True}])
def test_hf_folder_tokenizer_loads(tmp_path: Path, eos: object) -> None:
    raw = _hf_folder(tmp_path / "hf", eos)
    tok = build_tokenizer(DataConfig(tokenizer=str(tmp_path / "hf")), [], tmp_path)
    assert tok.eot_id == raw.token_to_id("</s>" if eos is None else "<s>")
    assert tok.encode(CORPUS[1]) == raw.encode(CORPUS[1]).ids and tok.decode(tok.encode(CORPUS[4])) == CORPUS[4]
    tok.save(tmp_path / "saved")
    assert load_tokenizer(tmp_path / "saved").eot_id == tok.eot_id


def test_prepare_data_caches_and_keys_on_content(corpus_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = DataConfig(source=str(corpus_dir), tokenizer="bpe", bpe_vocab_size=300, cache_dir=str(tmp_path / "cache"),
                     val_fraction=0.2)
    data = prepare_data(cfg)
    assert data.train.dtype == np.uint16 and data.val.dtype == np.uint16 and not data.train.flags.writeable
    assert data.num_documents["train"] + data.num_documents["val"] == len(CORPUS)
    assert (data.train == data.tokenizer.eot_id).sum() == data.num_documents["train"]
    assert data.train[-1] == data.tokenizer.eot_id and data.val[-1] == data.tokenizer.eot_id
    assert {p.name for p in data.cache_path.iterdir()} == {"train.bin", "val.bin", "meta.json", "tokenizer"}
    assert load_tokenizer(data.cache_path / "tokenizer").fingerprint == data.tokenizer.fingerprint

    monkeypatch.setattr(cache_mod, "write_tokens", lambda *a: pytest.fail("the second call re-tokenized"))
    again = prepare_data(cfg)
    assert again.cache_path == data.cache_path and np.array_equal(again.train, data.train)

    (corpus_dir / "doc00.py").write_text("changed\n")
    with pytest.raises(pytest.fail.Exception):
        prepare_data(cfg)


def test_prepare_data_byte_tokens_match_documents(corpus_dir: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HASTEN_CACHE", str(tmp_path / "env-cache"))
    cfg = DataConfig(source=str(corpus_dir), tokenizer="byte", val_fraction=0.2)
    data = prepare_data(cfg)
    assert data.cache_path.is_relative_to(tmp_path / "env-cache")
    train_docs, val_docs = split_documents(load_documents(cfg), 0.2)
    expected = b"".join(d.text.encode() + b"\x00" for d in val_docs)
    got = bytes(0 if t == 256 else int(t) for t in data.val)
    assert got == expected and data.val.dtype == np.uint16
    assert not list(data.cache_path.parent.glob(".*"))  # no temp folder left behind


def test_unigram_cross_entropy_by_hand() -> None:
    train = np.array([0, 0, 1], dtype=np.uint16)
    val = np.array([0, 2], dtype=np.uint16)
    # add-one over vocab 3: p = (3/6, 2/6, 1/6)
    expected = -(math.log(3 / 6) + math.log(1 / 6)) / 2
    assert unigram_cross_entropy(train, val, 3) == pytest.approx(expected)
    with pytest.raises(ValueError):
        unigram_cross_entropy(train, val, 2)


TOKENS = np.arange(1000, dtype=np.uint16) % 500


def test_sampler_is_pure_and_shifts_targets() -> None:
    sampler = WindowSampler(TOKENS, seq_len=16, batch_size=4, seed=7)
    x, y = sampler.batch(3, micro=1)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert (y[:, :-1] == x[:, 1:]).all()
    x_again, _ = WindowSampler(TOKENS, seq_len=16, batch_size=4, seed=7).batch(3, micro=1)
    assert (x == x_again).all()
    assert not (x == sampler.batch(4, micro=1)[0]).all() and not (x == sampler.batch(3, micro=0)[0]).all()
    assert not (x == WindowSampler(TOKENS, 16, 4, seed=8).batch(3, micro=1)[0]).all()


def test_sampler_ranks_split_one_global_batch() -> None:
    single = WindowSampler(TOKENS, seq_len=8, batch_size=12, seed=1).batch(5)
    parts = [WindowSampler(TOKENS, 8, 4, seed=1, rank=r, world_size=3).batch(5) for r in range(3)]
    assert torch.equal(torch.cat([p[0] for p in parts]), single[0])
    assert torch.equal(torch.cat([p[1] for p in parts]), single[1])


def test_sampler_bounds() -> None:
    short = np.arange(10, dtype=np.uint16)
    sampler = WindowSampler(short, seq_len=8, batch_size=64, seed=0)
    starts = np.concatenate([sampler.offsets(s) for s in range(20)])
    assert starts.min() == 0 and starts.max() == 1  # both possible windows, never past the end
    x, y = sampler.batch(0)
    assert int(y.max()) <= 9
    with pytest.raises(ConfigError, match="seq_len"):
        WindowSampler(short, seq_len=9, batch_size=1, seed=0)
