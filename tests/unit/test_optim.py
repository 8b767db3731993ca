import math

import pytest
import torch
from torch import nn

from hasten.config import ConfigError, OptimConfig
from hasten.optim import build_optimizer, build_schedule, optimizer_state_bytes, param_groups
from hasten.optim.schedule import over_time, warmup_cosine, warmup_stable_decay


def test_warmup_cosine_endpoints():
    total, warmup = 100, 10
    values = [warmup_cosine(s, total=total, warmup=warmup, min_ratio=0.1) for s in range(total + 1)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[warmup] == pytest.approx(1.0)
    assert values[total] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[warmup:], values[warmup + 1:]))


def test_wsd_has_a_plateau_then_decays_linearly():
    values = [warmup_stable_decay(s, total=100, warmup=10, min_ratio=0.0, decay_fraction=0.2) for s in range(100)]
    assert values[10:80] == [1.0] * 70
    assert values[99] == pytest.approx(0.0)
    assert values[90] == pytest.approx(1 - 11 / 20)


def test_schedule_choice():
    for name in ("cosine", "wsd", "constant"):
        fn = build_schedule(OptimConfig(schedule=name, warmup_steps=5), total_steps=50)
        assert fn(0) == pytest.approx(0.2) and 0 < fn(49) <= 1.0
    assert build_schedule(OptimConfig(schedule="constant", warmup_steps=5), 50)(49) == 1.0


def test_schedule_over_time_follows_the_time_spent_after_a_warmup_in_steps():
    fn = build_schedule(OptimConfig(schedule="cosine", horizon="time", warmup_steps=4, min_lr_ratio=0.1),
                        total_steps=10**6)
    assert fn(0, 0.9) == pytest.approx(0.25) and fn(3, 0.9) == pytest.approx(1.0)  # warmup ignores the clock
    assert fn(4, 0.0) == pytest.approx(1.0) and fn(4, 0.5) == pytest.approx(0.55) and fn(4, 1.0) == pytest.approx(0.1)
    assert fn(10**5, 0.5) == fn(10, 0.5)  # the step no longer places the rate
    assert fn(10, 3.0) == pytest.approx(0.1) and fn(10, -1.0) == pytest.approx(1.0)  # clamped
    same_steps = [warmup_stable_decay(s, total=100, warmup=0, min_ratio=0.0, decay_fraction=0.2) for s in range(100)]
    same_time = [over_time(1, (s + 1) / 100, schedule="wsd", warmup=0, min_ratio=0.0, decay_fraction=0.2)
                 for s in range(100)]
    assert same_time == pytest.approx(same_steps)  # one shape, steps or time
    constant = build_schedule(OptimConfig(schedule="constant", horizon="time", warmup_steps=0), 10)
    assert constant(5, 0.99) == 1.0


def test_schedule_over_time_needs_a_time_limit():
    from hasten.config import load_config

    with pytest.raises(ConfigError, match="optim.horizon.*train.time_limit_s"):
        load_config("default", ["optim.horizon=time"])
    assert load_config("default", ["optim.horizon=time", "train.time_limit_s=60"]).optim.horizon == "time"


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # tied


def test_param_groups_decay_only_matrices():
    model = Net()
    decay, no_decay = param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert sum(p.numel() for p in no_decay["params"]) == 40 + 4 + 4 + 4  # embedding once, bias, norm


def test_frozen_model_is_an_error():
    model = Net().requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer(model, OptimConfig(), torch.device("cpu"))


def test_fused_on_cpu_is_an_error():
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        build_optimizer(Net(), OptimConfig(fused="on"), torch.device("cpu"))


def test_adamw_lowers_a_convex_loss_and_reports_state_bytes():
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    opt = build_optimizer(model, OptimConfig(lr=0.05, weight_decay=0.0), torch.device("cpu"))
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    first = None
    for _ in range(50):
        loss = ((model(x) - y) ** 2).mean()
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.7 * first and math.isfinite(loss.item())
    assert optimizer_state_bytes(opt) == 2 * 9 * 4 + 2 * 4  # exp_avg, exp_avg_sq per param + step scalars
