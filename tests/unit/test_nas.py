"""Latency-aware DARTS over each layer's mixer: the relaxation, the latency term, the search."""

from __future__ import annotations

import json

import pytest
import torch

from hasten.config import ConfigError, ModelConfig, load_config
from hasten.models import build_model
from hasten.nas import (
    MixedOp,
    build_supernet,
    derive,
    expected_latency,
    latency_table,
    search,
)
from hasten.nas.supernet import architecture_parameters, weight_parameters

SHAPE = ModelConfig(preset="tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)


def _x_and_rope(model, T=16):
    x = torch.randn(2, T, SHAPE.dim, generator=torch.Generator().manual_seed(0))
    return x, (model.rope_cos[:T], model.rope_sin[:T])


def test_a_mixed_layer_is_the_softmax_weighted_sum_of_its_candidates():
    torch.manual_seed(0)
    model = build_supernet(SHAPE, 64, "AM")
    layer = model.layers[0].mixer
    with torch.no_grad():
        layer.alpha.copy_(torch.tensor([0.3, -1.1]))
    x, rope = _x_and_rope(model)
    p = torch.exp(torch.tensor([0.3, -1.1])) / torch.exp(torch.tensor([0.3, -1.1])).sum()  # the softmax by hand
    expected = p[0] * layer.candidates["A"](x, rope=rope) + p[1] * layer.candidates["M"](x, rope=rope)
    torch.testing.assert_close(layer(x, rope=rope), expected)


def test_candidates_are_initialized_as_their_own_decoders_and_alpha_starts_uniform():
    torch.manual_seed(0)
    supernet = build_supernet(SHAPE, 64, "AM")
    torch.manual_seed(0)
    attention = build_model(SHAPE.__class__(**{**SHAPE.__dict__, "mixers": "A"}), 64)
    assert torch.equal(supernet.layers[1].mixer.candidates["A"].wq.weight, attention.layers[1].mixer.wq.weight)
    assert all(torch.equal(a, torch.zeros(2)) for a in architecture_parameters(supernet))
    assert len(weight_parameters(supernet)) + 2 == len(list(supernet.parameters()))


def test_the_expected_latency_and_its_gradient_favour_the_cheaper_candidate():
    model = build_supernet(SHAPE, 64, "AM")
    table = {"A": 3.0, "M": 1.0}
    latency = expected_latency(model, table)
    assert latency.item() == pytest.approx(2 * (0.5 * 3.0 + 0.5 * 1.0))  # uniform: the mean, per layer
    latency.backward()
    for alpha in architecture_parameters(model):  # d/dalpha of p.l = p * (l - p.l): +0.5 for A, -0.5 for M
        torch.testing.assert_close(alpha.grad, torch.tensor([0.5, -0.5]))


def test_derive_takes_each_layers_most_probable_candidate():
    model = build_supernet(SHAPE, 64, "AM")
    with torch.no_grad():
        model.layers[0].mixer.alpha.copy_(torch.tensor([0.1, 0.2]))
        model.layers[1].mixer.alpha.copy_(torch.tensor([0.5, -0.2]))
    assert derive(model) == "MA"
    assert isinstance(model.layers[0].mixer, MixedOp)


@pytest.mark.parametrize("letters", ["A", "AA", "AX"])
def test_bad_candidates_are_refused(letters):
    with pytest.raises(ConfigError, match="nas.candidates"):
        build_supernet(SHAPE, 64, letters)


def test_the_latency_table_times_every_candidate():
    hybrid = SHAPE.__class__(**{**SHAPE.__dict__, "mixers": "MA", "ffns": "DE"})  # per-layer patterns in the recipe
    table = latency_table(hybrid, "AMDE", batch=1, seq_len=16, device=torch.device("cpu"), repeats=3)
    assert set(table) == {"A", "M", "D", "E"} and all(v > 0 for v in table.values())


@pytest.mark.parametrize("table,expected", [({"A": 1.0, "M": 10.0}, "AA"), ({"A": 10.0, "M": 1.0}, "MM")])
def test_a_heavy_latency_weight_derives_the_faster_mixer_everywhere(tiny_config, tmp_path, table, expected):
    cfg = tiny_config("nas.steps=30", "nas.warmup_steps=5", "nas.latency_weight=20", "nas.alpha_lr=0.05",
                      "log.every=20")
    result = search(cfg, latency_ms=table)
    assert result["derived_mixers"] == expected
    written = json.loads((tmp_path / "run" / "nas.json").read_text())
    assert written["derived_mixers"] == expected and written["latency_ms"] == table
    assert written["history"][-1]["loss"] < written["history"][0]["loss"]  # the weights trained too
    load_config("default", [f"model.mixers={expected}", "model.preset=tiny"])  # a pattern hasten train accepts


def test_a_search_continued_from_its_saved_state_ends_as_an_uninterrupted_one(tiny_config):
    table = {"A": 1.0, "M": 3.0}
    common = ("nas.warmup_steps=2", "nas.latency_weight=1", "nas.alpha_lr=0.05", "log.every=2")
    straight = search(tiny_config("nas.steps=8", *common, out="straight"), latency_ms=table)
    first = search(tiny_config("nas.steps=4", *common, out="split"), latency_ms=table)
    assert first["steps_done"] == 4 and first["complete"]
    # no table passed: the resumed search uses the one saved with its state
    resumed = search(tiny_config("nas.steps=8", *common, "train.resume=auto", out="split"))
    assert resumed["steps_done"] == 8 and resumed["latency_ms"] == table
    assert resumed["probabilities"] == straight["probabilities"]
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    with pytest.raises(ConfigError, match="searched AM/- over 2 layers, not AM/DE"):
        search(tiny_config("nas.steps=8", *common, "nas.ffn_candidates=DE", "train.resume=auto", out="split"),
               latency_ms={**table, "D": 1.0, "E": 2.0})
    fresh = search(tiny_config("nas.steps=3", *common, out="split"), latency_ms=table)  # resume=none starts over
    assert [h["step"] for h in fresh["history"]] == [2, 3]


def test_nas_config_is_checked():
    with pytest.raises(ConfigError, match="nas.warmup_steps"):
        load_config("default", ["nas.steps=10", "nas.warmup_steps=10"])
    with pytest.raises(ConfigError, match="hasten nas runs in one process"):
        search(load_config("default", ["parallel.strategy=ddp"]))


def test_ffn_candidates_mix_dense_and_mixture_of_experts_layers():
    torch.manual_seed(0)
    model = build_supernet(SHAPE, 64, "AM", ffn_letters="DE")
    ffn = model.layers[0].ffn
    assert isinstance(ffn, MixedOp) and ffn.letters == "DE" and len(architecture_parameters(model)) == 4
    x = torch.randn(2, 8, SHAPE.dim)
    p = torch.softmax(ffn.alpha.detach(), 0)
    torch.testing.assert_close(ffn(x), p[0] * ffn.candidates["D"](x) + p[1] * ffn.candidates["E"](x))
    assert (derive(model), derive(model, "ffn")) == ("AA", "DD")  # uniform: the first candidates
    with pytest.raises(ConfigError, match="nas.ffn_candidates='DX'"):
        build_supernet(SHAPE, 64, "AM", ffn_letters="DX")


def test_the_search_also_picks_each_layers_ffn(tiny_config, tmp_path):
    cfg = tiny_config("nas.steps=30", "nas.warmup_steps=5", "nas.latency_weight=20", "nas.alpha_lr=0.05",
                      "nas.ffn_candidates=DE", "log.every=30")
    result = search(cfg, latency_ms={"A": 1.0, "M": 10.0, "D": 10.0, "E": 1.0})
    assert (result["derived_mixers"], result["derived_ffns"]) == ("AA", "EE")
    assert result["train_command"].endswith("model.mixers=AA model.ffns=EE")
    load_config("default", ["model.mixers=AA", "model.ffns=EE", "model.preset=tiny"])
