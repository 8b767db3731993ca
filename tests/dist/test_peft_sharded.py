"""LoRA under ZeRO-3: the checkpoint of a 2-rank FSDP2 run holds the whole trained adapters.

A known failure of peer stacks is an adapter saved from a sharded model that is empty or holds
one rank's shard only. Here a 2-rank zero3 LoRA run and a one-process LoRA run on the same global
batch (tests/dist/test_strategies.py says why the batches are the same) must leave the same
adapters: compared through the merged weights each checkpoint reloads to, minus the base they
started from, so an empty, partial or untrained adapter fails. Tolerance as in
test_strategies: sums in another order over 5 steps stay far below 1e-3 relative in fp32.
"""

from __future__ import annotations

import pytest
import torch

import hasten
from hasten.train.export import load_trained
from tests.dist.launch import spawn, train_ranks
from tests.dist.test_strategies import B, COMMON


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("peft-sharded") / "base"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HASTEN_CACHE", str(out.parent / "cache"))
        hasten.train(hasten.load_config("default", [*COMMON, f"train.batch_size={2 * B}", f"train.out_dir={out}",
                                                    "checkpoint.at_end=true"]))
        yield out


def test_zero3_lora_checkpoint_holds_the_whole_trained_adapter(base, tmp_path, monkeypatch):
    monkeypatch.setenv("HASTEN_CACHE", str(base.parent / "cache"))
    lora = [*COMMON, f"model.from={base}", "peft.method=lora", "peft.rank=4", "optim.lr=1e-2",
            "checkpoint.at_end=true"]
    spawn(train_ranks, [*lora, f"train.batch_size={B}", f"train.out_dir={tmp_path / 'two'}", "parallel.strategy=zero3"])
    hasten.train(hasten.load_config("default", [*lora, f"train.batch_size={2 * B}", f"train.out_dir={tmp_path / 'one'}"]))

    start = load_trained(base)[0].state_dict()
    sharded, single = load_trained(tmp_path / "two")[0].state_dict(), load_trained(tmp_path / "one")[0].state_dict()
    targets = [k for k in start if k.rsplit(".", 2)[-2] in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")]
    assert targets and sharded.keys() == single.keys() == start.keys()
    for name in targets:
        delta_sharded, delta_single = sharded[name] - start[name], single[name] - start[name]
        assert delta_single.abs().max() > 1e-4, f"{name}: the adapter did not train"
        torch.testing.assert_close(delta_sharded, delta_single, rtol=1e-3, atol=1e-6, msg=name)
    for name in set(start) - set(targets):  # everything else is the frozen base
        torch.testing.assert_close(sharded[name], start[name], rtol=0, atol=0)
