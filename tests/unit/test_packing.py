"""Packed instruction batches: whole records per row, positions restarting at each, and a decoder
that computes a packed record exactly as it computes it alone."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from hasten.data import ByteTokenizer
from hasten.data.instruct import IGNORE_INDEX, InstructBatches, PackedInstructBatches, encode_example

SEQ = 48


def _records(n=40, seed=0):
    rng = random.Random(seed)
    return [(f"Q{rng.randint(0, 10**rng.randint(1, 12))}?", "A" * rng.randint(1, 30)) for _ in range(n)]


def _segments(positions_T):
    return np.cumsum(positions_T == 0)


def test_rows_hold_whole_records_and_positions_restart_at_each():
    tok, records = ByteTokenizer(), _records()
    packed = PackedInstructBatches(records, tok, SEQ, batch_size=4, seed=0)
    x, y, pos = (t.numpy() for t in packed.batch(3, 1))
    rows = packed.rows(3, 1)
    assert x.shape == y.shape == pos.shape == (4, SEQ)
    assert sum(map(len, rows)) > len(rows)  # short records: several per row
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            want_x, want_y = encode_example(tok, *records[i], SEQ)
            n = len(want_x)
            assert x[r, at:at + n].tolist() == want_x and y[r, at:at + n].tolist() == want_y
            assert pos[r, at:at + n].tolist() == list(range(n))
            at += n
        assert (y[r, at:] == IGNORE_INDEX).all() and at <= SEQ
    padded = InstructBatches(records, tok, SEQ, batch_size=4, seed=0)
    assert (y != IGNORE_INDEX).sum() > (padded.batch(3, 1)[1] != IGNORE_INDEX).sum()


def test_batches_are_a_pure_function_of_step_and_ranks_split_the_world_batch():
    tok, records = ByteTokenizer(), _records()
    whole = PackedInstructBatches(records, tok, SEQ, batch_size=4, seed=5)
    halves = [PackedInstructBatches(records, tok, SEQ, batch_size=2, seed=5, rank=r, world_size=2) for r in (0, 1)]
    for a, b in zip(whole.batch(7, 0), whole.batch(7, 0)):
        assert torch.equal(a, b)
    for a, b0, b1 in zip(whole.batch(7, 0), halves[0].batch(7, 0), halves[1].batch(7, 0)):
        assert torch.equal(a, torch.cat([b0, b1]))
    assert not torch.equal(whole.batch(7, 0)[0], whole.batch(8, 0)[0])


@pytest.mark.parametrize("kv_heads", [0, 2])  # full heads and grouped-query heads
def test_a_packed_record_is_computed_as_if_alone(kv_heads):
    from hasten.config import ModelConfig
    from hasten.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny", n_kv_heads=kv_heads, max_seq_len=SEQ), 260).eval()
    tok, records = ByteTokenizer(), _records()
    packed = PackedInstructBatches(records, tok, SEQ, batch_size=3, seed=1)
    x, _, pos = packed.batch(0, 0)
    with torch.no_grad():
        together = model(x, positions_BT=pos)
        for r, row in enumerate(packed.rows(0, 0)):
            at = 0
            for i in row:
                ids = torch.tensor([encode_example(tok, *records[i], SEQ)[0]])
                alone = model(ids)[0]
                torch.testing.assert_close(together[r, at:at + len(alone)], alone, rtol=1e-4, atol=1e-5)
                at += len(alone)
        # without the positions, the records after the first of a row would see the ones before
        second = packed.lengths[packed.rows(0, 0)[0][0]]
        assert not torch.allclose(model(x)[0, second:], together[0, second:], atol=1e-3)


def test_packing_refuses_mamba_layers():
    from hasten.config import ModelConfig
    from hasten.models import build_model

    model = build_model(ModelConfig(preset="tiny", n_layers=2, mixers="MA", max_seq_len=SEQ), 260)
    with pytest.raises(ValueError, match="packed sequences need attention in every layer"):
        model(torch.zeros(1, 8, dtype=torch.long), positions_BT=torch.zeros(1, 8, dtype=torch.long))


def test_pack_auto_pads_for_mamba_layers_and_on_refuses(tmp_path, monkeypatch):
    import json

    import hasten
    from hasten.config import ConfigError

    monkeypatch.setenv("HASTEN_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in _records()))
    common = ["model.preset=tiny", "model.n_layers=2", "model.mixers=MA", "model.ssm_state=16", "model.ssm_head_dim=16",
              "model.ssm_chunk=16", f"model.max_seq_len={SEQ}", f"train.seq_len={SEQ}", "data.tokenizer=byte",
              f"data.source={data}", "train.steps=2", "train.batch_size=2", "train.eval_every=0",
              "log.progress=false", "log.plot=false", "log.tensorboard=false", "log.sample_tokens=0",
              "checkpoint.every=0", "checkpoint.at_end=false"]
    summary = hasten.train(hasten.load_config("default", [*common, f"train.out_dir={tmp_path / 'auto'}"]))
    assert summary["completed"]
    with pytest.raises(ConfigError, match="data.pack=on needs attention in every layer"):
        hasten.train(hasten.load_config("default", [*common, "data.pack=on", f"train.out_dir={tmp_path / 'on'}"]))
