"""Knowledge distillation: the KD term against its formula written plainly, and distilled runs
(frozen teacher, both terms logged, plain cross-entropy for validation, exact resume)."""

import json
import math

import pytest
import torch
from torch import nn

import hasten
from hasten.methods.distill import kd_loss
from hasten.train.build import build_run, lm_loss
from hasten.train.checkpoint import list_checkpoints
from hasten.train.log import read_log


def _reference_kd(s, t, temperature, mask=None):
    """T^2 * mean over kept positions of sum_v p_t (log p_t - log p_s), in float64."""
    s, t = s.double().reshape(-1, s.shape[-1]) / temperature, t.double().reshape(-1, t.shape[-1]) / temperature
    p_t = torch.softmax(t, -1)
    kl = (p_t * (torch.log(p_t) - torch.log(torch.softmax(s, -1)))).sum(-1)
    keep = torch.ones_like(kl) if mask is None else mask.reshape(-1).double()
    return (kl * keep).sum() / keep.sum() * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_loss_matches_the_formula_and_its_gradient(temperature):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 5, 11, generator=g, requires_grad=True)
    t = torch.randn(3, 5, 11, generator=g) * 2
    mask = torch.rand(3, 5, generator=g) > 0.3
    for m in (None, mask):
        got = kd_loss(s, t, temperature, m)
        ref = _reference_kd(s, t, temperature, m)
        assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-6)
        (grad,) = torch.autograd.grad(got, s)
        # d/ds of T^2 KL(p_t || softmax(s/T)) is T (softmax(s/T) - p_t), per kept position, / their count
        keep = torch.ones(3, 5) if m is None else m.float()
        expected = temperature * (torch.softmax(s / temperature, -1) - torch.softmax(t / temperature, -1))
        expected = expected * keep[..., None] / keep.sum()
        assert torch.allclose(grad, expected.detach(), rtol=1e-4, atol=1e-6)


def test_kd_loss_is_zero_only_for_equal_distributions():
    s = torch.randn(4, 9)
    assert kd_loss(s, s.clone(), 2.0).abs() < 1e-6
    assert kd_loss(s, s + 5.0, 2.0).abs() < 1e-6  # a constant shift is the same distribution
    assert kd_loss(s, torch.randn(4, 9), 2.0) > 1e-3
    with pytest.raises(ValueError, match="one vocabulary"):
        kd_loss(s, torch.randn(4, 10))


@pytest.fixture
def teacher(tiny_config, tmp_path):
    """A tiny trained teacher run (wider than the students below)."""
    hasten.train(tiny_config("train.steps=20", "model.dim=128", "train.eval_every=20", out="teacher"))
    return tmp_path / "teacher"


def test_a_distilled_run_logs_both_terms_and_trains_the_student_alone(tiny_config, teacher, tmp_path):
    cfg = tiny_config(f"distill.teacher={teacher}", "distill.alpha=0.7", "model.n_layers=1", "train.steps=12",
                      "log.every=4", "train.eval_every=12", out="student")
    summary = hasten.train(cfg)
    records = [r for r in read_log(tmp_path / "student" / "metrics.jsonl") if r["event"] == "train"]
    for r in records:  # the logged loss is the mix of the two logged terms
        assert r["kd"] > 0 and math.isfinite(r["ce"])
        assert r["loss"] == pytest.approx(0.3 * r["ce"] + 0.7 * r["kd"], rel=1e-5)
    assert records[-1]["loss"] < records[0]["loss"]
    assert summary["teacher_params"] > summary["params"]
    # The checkpoint holds the student alone: it loads into a one-layer model.
    model, _, model_cfg = hasten.api.load_trained(tmp_path / "student")
    assert model_cfg.n_layers == 1 and sum(p.numel() for p in model.parameters()) == summary["params"]


def test_the_teacher_is_frozen_and_validation_is_plain_cross_entropy(tiny_config, teacher):
    run = build_run(tiny_config(f"distill.teacher={teacher}", "model.n_layers=1", out="student"))
    teacher_model = run.loss_fn.keywords["teacher"]
    assert not any(p.requires_grad for p in teacher_model.parameters()) and not teacher_model.training
    in_optimizer = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in run.model.parameters()}
    batch = tuple(t.to(run.device) for t in run.val_batches(0, 0))
    run.model.eval()
    assert torch.equal(run.loss_fn(run.model, batch), lm_loss(run.model, batch))
    run.model.train()
    loss, terms = run.loss_fn(run.model, batch)
    assert set(terms) == {"ce", "kd"} and torch.equal(terms["ce"], lm_loss(run.model, batch).detach())


def test_resume_with_a_teacher_is_bit_exact(tiny_config, teacher, tmp_path):
    common = (f"distill.teacher={teacher}", "model.n_layers=1", "train.steps=6", "checkpoint.every=3",
              "log.every=1", "train.eval_every=6")
    hasten.train(tiny_config(*common, out="straight"))
    half = list_checkpoints(tmp_path / "straight")[0]
    hasten.train(tiny_config(*common, f"train.resume={half}", out="resumed"))

    def losses(name):
        return {r["step"]: r["loss"] for r in read_log(tmp_path / name / "metrics.jsonl") if r["event"] == "train"}

    a, b = losses("straight"), losses("resumed")
    assert sorted(b) == [4, 5, 6] and [a[s] for s in b] == [b[s] for s in b]


def test_bad_distillation_settings_fail_with_one_sentence(tiny_config, teacher, tmp_path):
    with pytest.raises(hasten.ConfigError, match="distill.teacher='.*nowhere' does not exist"):
        hasten.train(tiny_config(f"distill.teacher={tmp_path / 'nowhere'}", out="a"))
    with pytest.raises(hasten.ConfigError, match="teacher's positions end at 256"):
        hasten.train(tiny_config(f"distill.teacher={teacher}", "model.max_seq_len=512", "train.seq_len=512", out="b"))
    with pytest.raises(hasten.ConfigError, match="distill.temperature=0.0 is not allowed"):
        tiny_config(f"distill.teacher={teacher}", "distill.temperature=0")
    with pytest.raises(hasten.ConfigError, match="with your own model, add hasten.methods.distill.kd_loss"):
        hasten.train(tiny_config(f"distill.teacher={teacher}", out="c"), model=nn.Linear(2, 2),
                     loss_fn=lambda m, b: m(b[0]).sum(), train_batches=lambda s, m: (torch.randn(1, 2),))


def test_a_hugging_face_teacher_teaches_a_hasten_student_in_its_own_tokens(tiny_config, tmp_path):
    pytest.importorskip("transformers")
    from tests.unit.test_peft import make_hf_llama

    make_hf_llama(tmp_path / "hf")
    summary = hasten.train(tiny_config(f"distill.teacher={tmp_path / 'hf'}", "train.steps=4", "log.every=2",
                                       "train.eval_every=4", out="student"))
    assert summary["completed"] and math.isfinite(summary["final_val_loss"])
    assert f'tokenizer = "{tmp_path / "hf"}"' in (tmp_path / "student" / "config.toml").read_text()
    kd = [r["kd"] for r in read_log(tmp_path / "student" / "metrics.jsonl") if r["event"] == "train"]
    assert kd and all(math.isfinite(v) and v > 0 for v in kd)


def test_the_loss_plot_draws_the_cross_entropy_beside_the_mixed_loss(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from hasten.train.log import plot_losses

    log = tmp_path / "metrics.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in [
        {"event": "train", "step": 1, "loss": 2.0, "ce": 3.0, "kd": 1.0},
        {"event": "train", "step": 2, "loss": 1.5, "ce": 2.5, "kd": 0.5},
        {"event": "eval", "step": 2, "val_loss": 2.6}]))
    drawn, original = [], plt.Axes.plot
    monkeypatch.setattr(plt.Axes, "plot", lambda self, *a, **k: drawn.append(k.get("label")) or original(self, *a, **k))
    assert plot_losses(log, tmp_path / "loss.png") == tmp_path / "loss.png"
    assert drawn == ["train (with its extra terms)", "train cross-entropy", "validation"]
    assert (tmp_path / "loss.png").stat().st_size > 1000
