"""Every registered optimizer passes the same conformance table; SophiaG, Lion and Muon's fallback are
checked step by step against the papers' equations written plainly."""

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import hasten
from hasten.config import ConfigError, OptimConfig
from hasten.optim import (Lion, MuonNS, SophiaG, build_optimizer, build_schedule, muon_params, newton_schulz,
                          optimizer_names, optimizer_spec, optimizer_state_bytes, register_optimizer)
from hasten.optim.builder import _needs_package
from hasten.optim.hooks import set_train_mode
from hasten.optim.muon import NS_COEFFICIENTS
from hasten.train.checkpoint import list_checkpoints
from hasten.train.log import read_log

CPU = torch.device("cpu")
NAMES = optimizer_names()


def _skip_if_unavailable(name: str) -> None:
    if reason := optimizer_spec(name).unavailable(CPU):
        pytest.skip(f"{name} cannot run here: {reason}")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 1))  # one hidden matrix (Muon) and a head


def _regression_loss(model: nn.Module, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 8, generator=g)
    return ((model(x) - x.sum(dim=1, keepdim=True)) ** 2).mean()


def _build(name: str, model: nn.Module, **overrides) -> torch.optim.Optimizer:
    cfg = OptimConfig(name=name, lr=1e-2, weight_decay=0.01, **overrides)
    return build_optimizer(model, cfg, CPU)


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int = 0) -> None:
    _regression_loss(model, seed).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# --- the registry -------------------------------------------------------------------------------

def test_registry_and_config_list_the_same_optimizers():
    choices = dataclasses.fields(OptimConfig)[0].metadata["choices"]
    assert sorted(NAMES) == sorted(choices)


def test_registry_rejects_a_duplicate_name():
    with pytest.raises(ValueError, match="already registered"):
        register_optimizer("lion", "again")(lambda model, cfg, device: None)


# --- the conformance table, one row per registered optimizer ------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_one_step_lowers_a_convex_loss(name):
    _skip_if_unavailable(name)
    model = _mlp()
    optimizer = _build(name, model)
    before = _regression_loss(model).item()
    _step(model, optimizer)
    assert _regression_loss(model).item() < before
    assert optimizer_state_bytes(optimizer) > 0


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_continues_identically(name):
    """A fresh optimizer loaded from another's state_dict takes exactly the same next steps."""
    _skip_if_unavailable(name)
    model = _mlp()
    optimizer = _build(name, model)
    for seed in range(3):
        _step(model, optimizer, seed)
    twin = copy.deepcopy(model)
    twin_optimizer = _build(name, twin)
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for seed in range(3, 6):
        _step(model, optimizer, seed)
        _step(twin, twin_optimizer, seed)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_resume_through_checkpoints_is_exact(name, tiny_config, tmp_path):
    """8 steps straight equal 4 steps + resume from hasten's DCP checkpoint + 4 steps, loss for loss."""
    _skip_if_unavailable(name)
    common = (f"optim.name={name}", "optim.lr=3e-3", "optim.sophia_hessian_every=3", "train.steps=8",
              "checkpoint.every=4", "log.every=1", "train.eval_every=4", "model.dropout=0.1")
    hasten.train(tiny_config(*common, out="straight"))
    half = list_checkpoints(tmp_path / "straight")[0]
    hasten.train(tiny_config(*common, f"train.resume={half}", out="resumed"))
    a, b = (_log(tmp_path / run) for run in ("straight", "resumed"))
    assert sorted(b) == [5, 6, 7, 8]
    assert [a[s] for s in b] == [b[s] for s in b]
    assert _log(tmp_path / "straight", "eval", "val_loss")[8] == _log(tmp_path / "resumed", "eval", "val_loss")[8]


def test_resume_continues_muon_momentum_warmup(tiny_config, tmp_path):
    """The warmup's step count travels in hasten's checkpoints: a resume mid-ramp is exact."""
    common = ("optim.name=muon", "optim.lr=3e-3", "optim.muon_momentum_warmup=6", "optim.muon_momentum_start=0.5",
              "train.steps=8", "checkpoint.every=4", "log.every=1", "train.eval_every=0")
    hasten.train(tiny_config(*common, out="straight"))
    hasten.train(tiny_config(*common, f"train.resume={list_checkpoints(tmp_path / 'straight')[0]}", out="resumed"))
    a, b = (_log(tmp_path / run) for run in ("straight", "resumed"))
    assert sorted(b) == [5, 6, 7, 8] and [a[s] for s in b] == [b[s] for s in b]


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_trains_without_nan(name, tiny_config, tmp_path):
    _skip_if_unavailable(name)
    lr = "3e-2" if name == "adafactor" else "3e-3"  # Adafactor's rate is relative to the weights' scale
    summary = hasten.train(tiny_config(f"optim.name={name}", f"optim.lr={lr}", "precision.dtype=bf16",
                                       "train.steps=12", "log.every=2", "train.eval_every=12",
                                       "optim.sophia_hessian_every=2"))
    losses = _log(tmp_path / "run")
    assert summary["completed"] and summary["skipped_steps"] == 0
    assert all(math.isfinite(v) for v in losses.values()) and math.isfinite(summary["final_val_loss"])
    assert losses[12] < losses[2]
    assert summary["optimizer_state_bytes"] > 0


def _log(run_dir, event="train", key="loss"):
    return {r["step"]: r[key] for r in read_log(run_dir / "metrics.jsonl") if r["event"] == event}


# --- SophiaG and Lion against the papers' equations ---------------------------------------------

def _random_problem(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]


@pytest.mark.parametrize("bias_correction", [False, True])
def test_sophia_matches_algorithm_3_step_by_step(bias_correction):
    """θ ← θ(1-ηλ); m ← β1 m + (1-β1) g; θ ← θ - η clip(m / max(ρh, ε), 1); every k steps
    h ← β2 h + (1-β2) B ĝ⊙ĝ, on random gradients, with the Hessian refreshed at steps 1, 3, 5.
    With bias_correction the step uses h / (1 - β2^n) after n refreshes; the count is saved."""
    lr, b1, b2, rho, wd, eps, batch = 0.05, 0.965, 0.9, 0.04, 0.1, 1e-15, 64
    params = [nn.Parameter(t) for t in _random_problem(0)]
    optimizer = SophiaG(params, lr=lr, betas=(b1, b2), rho=rho, weight_decay=wd, eps=eps, hessian_every=2,
                        bias_correction=bias_correction)
    ref = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in ref]
    h = [torch.zeros_like(p) for p in ref]
    refreshes = 0
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        grads = [torch.randn(p.shape, generator=g) for p in ref]
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        optimizer.step()
        correction = 1 - b2 ** refreshes if bias_correction and refreshes else 1.0
        for i, grad in enumerate(grads):
            ref[i] = ref[i] * (1 - lr * wd)
            m[i] = b1 * m[i] + (1 - b1) * grad
            ref[i] = ref[i] - lr * torch.clamp(m[i] / torch.clamp(rho * h[i] / correction, min=eps), -1, 1)
        if optimizer.needs_hessian(step):
            sampled = [torch.randn(p.shape, generator=g) * 0.1 for p in ref]
            for p, grad in zip(params, sampled):
                p.grad = grad.clone()
            optimizer.update_hessian(batch_size=batch)
            refreshes += 1
            for i, grad in enumerate(sampled):
                h[i] = b2 * h[i] + (1 - b2) * batch * grad * grad
        for p, r in zip(params, ref):
            torch.testing.assert_close(p.detach(), r, rtol=1e-6, atol=1e-7)
    assert [optimizer.needs_hessian(s) for s in range(6)] == [False, True] * 3
    assert all((optimizer.state[p]["hessian"] > 0).all() for p in params)
    restored = SophiaG([nn.Parameter(p.detach().clone()) for p in params], bias_correction=bias_correction)
    restored.load_state_dict(optimizer.state_dict())
    assert [int(s["hessian_updates"]) for s in restored.state.values()] == [3, 3]


def test_sophia_hessian_ignores_non_finite_gradients():
    p = nn.Parameter(torch.ones(3))
    optimizer = SophiaG([p])
    p.grad = torch.tensor([1.0, math.inf, math.nan])
    optimizer.update_hessian(batch_size=1)
    h = optimizer.state[p]["hessian"]
    assert h[0] > 0 and h[1] == 0 and h[2] == 0


def test_sophia_reports_the_fraction_of_unclipped_coordinates():
    """|m| < rho * h is the Newton-like part of the step; before any Hessian refresh (h = 0) every
    coordinate takes the clipped sign step."""
    p = nn.Parameter(torch.zeros(4))
    optimizer = SophiaG([p], lr=0.1, rho=1.0, betas=(0.0, 0.5), weight_decay=0.0)
    assert optimizer.metrics() == {}  # no state yet
    p.grad = torch.tensor([1.0, 1.0, 1.0, 1.0])
    optimizer.step()
    assert optimizer.metrics()["sophia_unclipped"] == 0.0
    p.grad = torch.tensor([4.0, 4.0, 0.1, 0.1])  # h = 0.5 * g^2 = 8, 8, 0.005, 0.005 against |m| = 1
    optimizer.update_hessian(batch_size=1)
    assert optimizer.metrics()["sophia_unclipped"] == 0.5
    optimizer.param_groups[0]["bias_correction"] = True  # h / (1 - 0.5): 0.01 is still below |m|
    assert optimizer.metrics()["sophia_unclipped"] == 0.5


def test_lion_matches_the_paper_step_by_step():
    """c = β1 m + (1-β1) g; θ ← θ - η (sign(c) + λθ); m ← β2 m + (1-β2) g."""
    lr, b1, b2, wd = 0.01, 0.9, 0.99, 0.3
    params = [nn.Parameter(t) for t in _random_problem(2)]
    optimizer = Lion(params, lr=lr, betas=(b1, b2), weight_decay=wd)
    ref = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in ref]
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=g) for p in ref]
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        optimizer.step()
        for i, grad in enumerate(grads):
            c = b1 * m[i] + (1 - b1) * grad
            ref[i] = ref[i] - lr * (torch.sign(c) + wd * ref[i])
            m[i] = b2 * m[i] + (1 - b2) * grad
        for p, r in zip(params, ref):
            torch.testing.assert_close(p.detach(), r, rtol=1e-6, atol=1e-7)


def test_lion_keeps_half_the_state_of_adamw():
    model, twin = _mlp(), _mlp()
    adamw, lion = _build("adamw", model), _build("lion", twin)
    _step(model, adamw)
    _step(twin, lion)
    moments = sum(p.numel() * 4 for p in model.parameters())
    assert optimizer_state_bytes(lion) == moments
    assert optimizer_state_bytes(adamw) == 2 * moments + 4 * len(list(model.parameters()))


# --- Muon -----------------------------------------------------------------------------------------

def test_newton_schulz_brings_singular_values_near_one():
    G = torch.randn(32, 48, generator=torch.Generator().manual_seed(0))
    for matrix in (G, G.T):
        singular = torch.linalg.svdvals(newton_schulz(matrix).float())
        assert singular.min() > 0.5 and singular.max() < 1.3


def test_newton_schulz_follows_the_quintic_iteration_to_bf16_precision():
    """The bf16 iteration (sums in the GEMMs' epilogues) against X <- aX + (bA + cA^2)X in fp64."""
    a, b, c = NS_COEFFICIENTS
    torch.manual_seed(0)
    for shape in [(64, 32), (32, 96), (3, 48, 96)]:
        G = torch.randn(*shape)
        X = G.double().mT if shape[-2] > shape[-1] else G.double()
        X = X / X.norm(dim=(-2, -1), keepdim=True)
        for _ in range(5):
            A = X @ X.mT
            X = a * X + (b * A + c * A @ A) @ X
        want = X.mT if shape[-2] > shape[-1] else X
        torch.testing.assert_close(newton_schulz(G).double(), want, atol=0.03, rtol=0)


def test_batched_newton_schulz_is_the_per_matrix_one():
    g = torch.Generator().manual_seed(0)
    for shape in ((6, 16, 24), (5, 24, 16)):  # wide and tall matrices
        batch = torch.randn(*shape, generator=g)
        torch.testing.assert_close(newton_schulz(batch), torch.stack([newton_schulz(m) for m in batch]),
                                   rtol=1e-2, atol=1e-2)  # bf16 iterates; batched products may round apart


@pytest.mark.parametrize("batch_elements", [2**27, 100])  # one batch per shape; one matrix per batch
def test_muon_step_of_mixed_shapes_follows_the_equations(batch_elements, monkeypatch):
    """MuonNS batches matrices by shape; each must move as Muon's update of that matrix alone."""
    monkeypatch.setattr("hasten.optim.muon.BATCH_ELEMENTS", batch_elements)
    g = torch.Generator().manual_seed(1)
    params = [nn.Parameter(torch.randn(*shape, generator=g)) for shape in ((8, 12), (12, 8), (8, 12), (8, 12))]
    start = [p.detach().clone() for p in params]
    grads = [torch.randn(p.shape, generator=g) for p in params]
    for p, grad in zip(params, grads):
        p.grad = grad.clone()
    MuonNS(params, lr=0.02, weight_decay=0.1, momentum=0.9).step()
    for p, w, grad in zip(params, start, grads):
        update = grad.lerp(grad * 0.1, 0.9)  # Nesterov: buf = 0.1 g after one step; update = lerp(g, buf, mu)
        want = w * (1 - 0.02 * 0.1) - 0.02 * max(1.0, p.shape[0] / p.shape[1]) ** 0.5 * newton_schulz(update).float()
        torch.testing.assert_close(p.detach(), want, rtol=1e-2, atol=2e-3)


@pytest.mark.parametrize("warmup", [0, 2])
def test_muon_momentum_over_steps_follows_the_equations(warmup):
    """Four steps of MuonNS (momentum kept across steps, all matrices stepped as lists) against the
    plain per-matrix recurrence; with a momentum warmup of 2 steps from 0.5 the momentum is 0.5,
    0.7, then 0.9, and the count survives a state-dict round trip."""
    from hasten.optim.muon import adjusted_lr
    g = torch.Generator().manual_seed(2)
    params = [nn.Parameter(torch.randn(*shape, generator=g)) for shape in ((8, 12), (12, 8), (8, 12), (16, 16))]
    want = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    opt = MuonNS(params, lr=0.02, weight_decay=0.1, momentum=0.9, momentum_warmup=warmup, momentum_start=0.5)
    momenta = [0.5, 0.7, 0.9, 0.9] if warmup else [0.9] * 4
    for step, mu in enumerate(momenta):
        if step == 2:  # a fresh optimizer from the saved state carries on the ramp
            saved = opt.state_dict()
            opt = MuonNS(params, lr=0.02, weight_decay=0.1, momentum=0.9, momentum_warmup=warmup, momentum_start=0.5)
            opt.load_state_dict(saved)
        grads = [torch.randn(p.shape, generator=g) for p in params]
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        opt.step()
        for w, buf, grad in zip(want, bufs, grads):
            buf.lerp_(grad, 1 - mu)
            w.mul_(1 - 0.02 * 0.1).add_(newton_schulz(grad.lerp(buf, mu)).float(),
                                         alpha=-adjusted_lr(0.02, w.shape, "original"))
    for p, w in zip(params, want):
        torch.testing.assert_close(p.detach(), w, rtol=1e-2, atol=2e-3)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="this PyTorch has no torch.optim.Muon")
@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
def test_muon_fallback_matches_torch_muon(adjust):
    torch.manual_seed(0)
    ours, theirs = nn.Parameter(torch.randn(16, 24)), nn.Parameter(torch.randn(16, 24))
    with torch.no_grad():
        theirs.copy_(ours)
    a = MuonNS([ours], lr=0.02, weight_decay=0.1, adjust_lr_fn=adjust)
    b = torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1, adjust_lr_fn=adjust)
    for seed in range(4):
        grad = torch.randn(16, 24, generator=torch.Generator().manual_seed(seed))
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        a.step()
        b.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=2e-2, atol=2e-3)  # bf16 iterations


def test_muon_takes_hidden_matrices_only(tiny_config):
    from hasten.models import build_model

    for tied in (True, False):
        model = build_model(dataclasses.replace(tiny_config().model, tie_embeddings=tied), 256)
        chosen = {id(p) for p in muon_params(model)}
        names = {n for n, p in model.named_parameters() if id(p) in chosen}
        assert names and all(p.ndim == 2 for n, p in model.named_parameters() if n in names)
        assert not any("embed" in n or n.startswith("output") or "norm" in n for n in names)
        hidden = {n for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("layers")}
        assert names == hidden
        optimizer = build_optimizer(model, OptimConfig(name="muon"), CPU)
        covered = {id(p) for g in optimizer.param_groups for p in g["params"]}
        assert covered == {id(p) for p in model.parameters()}  # the rest goes to AdamW


def test_muon_lr_scale_reaches_its_group(tiny_config):
    from hasten.optim.hooks import set_learning_rate

    optimizer = _build("muon", _mlp(), muon_lr_scale=4.0)
    set_learning_rate(optimizer, 0.01)
    assert [g["lr"] for g in optimizer.param_groups] == [0.04, 0.01, 0.01]


# --- the trainer's hooks and errors ---------------------------------------------------------------

def test_the_loop_refreshes_sophia_hessian_every_k_steps(tiny_config):
    calls = []

    def sampled(model, batch):
        calls.append(1)
        return model(batch[0]).pow(2).mean()

    def batches(step, micro):
        x = torch.randn(16, 8, generator=torch.Generator().manual_seed(step))
        return x, x.sum(dim=1, keepdim=True)

    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 1))
    config = tiny_config("optim.name=sophia", "optim.sophia_hessian_every=3", "train.steps=9", "train.eval_every=0",
                         "log.every=3")
    hasten.train(config,
                 model=model, loss_fn=lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), train_batches=batches,
                 sampled_loss_fn=sampled)
    assert len(calls) == 3
    logged = [r for r in read_log(Path(config.train.out_dir) / "metrics.jsonl") if r["event"] == "train"]
    assert logged and all(0.0 <= r["sophia_unclipped"] <= 1.0 for r in logged)


def test_sophia_on_a_user_model_needs_a_sampled_loss(tiny_config):
    with pytest.raises(ConfigError, match="sampled_loss_fn"):
        hasten.train(tiny_config("optim.name=sophia"), model=nn.Linear(8, 1),
                     loss_fn=lambda m, b: m(b[0]).mean(), train_batches=lambda s, m: (torch.randn(4, 8),))


def test_schedule_free_keeps_only_the_warmup():
    fn = build_schedule(OptimConfig(name="schedulefree_adamw", schedule="cosine", warmup_steps=5), 100)
    assert fn(0) == pytest.approx(0.2) and fn(5) == fn(99) == 1.0


def test_schedule_free_evaluates_at_the_averaged_point():
    _skip_if_unavailable("schedulefree_adamw")
    model = _mlp()
    optimizer = _build("schedulefree_adamw", model)
    for seed in range(3):
        _step(model, optimizer, seed)
    y = [p.detach().clone() for p in model.parameters()]
    set_train_mode(optimizer, False)
    assert any(not torch.equal(a, b) for a, b in zip(y, model.parameters()))
    set_train_mode(optimizer, True)
    for a, b in zip(y, model.parameters()):
        torch.testing.assert_close(a, b.detach())


def test_config_errors_are_one_sentence():
    with pytest.raises(ConfigError, match="fused kernel exists for adamw only"):
        OptimConfig(name="lion", fused="on")
    with pytest.raises(ConfigError, match="optim.sophia_rho"):
        OptimConfig(sophia_rho=0)
    assert "pip install 'hasten[optim]'" in _needs_package("surely_not_a_package_name")
