"""hasten's one-launch AdamW step (hasten.optim.triton_adamw) against torch's AdamW.

The kernel runs compiled on a GPU, or under Triton's interpreter on the CPU (tests/conftest.py)."""

import copy

import pytest
import torch
from torch import nn

from hasten.config import ConfigError, OptimConfig
from hasten.optim import build_optimizer
from hasten.optim.triton_adamw import TritonAdamW, adamw_step_

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="the optimizer class runs its kernel on CUDA only")


@pytest.mark.parametrize("clip", [False, True])
def test_step_matches_torch_adamw_and_a_skipped_step_changes_nothing(clip, triton_device):
    g = torch.Generator().manual_seed(0)
    shapes = [(16,), (48, 32), (3, 700), (4096,)]  # within a block, across blocks and programs, a partial last one
    params = [torch.randn(s, generator=g).to(triton_device) for s in shapes]
    ref = [p.clone().requires_grad_() for p in params]
    hyper = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    torch_opt = torch.optim.AdamW(ref, foreach=False, **hyper)
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    steps = [torch.zeros((), device=triton_device) for _ in params]
    divisor = torch.tensor(2.5 if clip else 1.0, device=triton_device)
    for _ in range(3):
        grads = [torch.randn(s, generator=g).to(triton_device) for s in shapes]
        kept = [x.clone() for x in grads]
        for r, x in zip(ref, grads):
            r.grad = x / divisor
        torch_opt.step()
        adamw_step_(params, grads, exp_avgs, exp_avg_sqs, steps, grad_scale=divisor if clip else None,
                    found_inf=torch.zeros((), device=triton_device), block=256, iters=4, **hyper)
        assert all(torch.equal(a, b) for a, b in zip(grads, kept))  # the gradients are left as they were
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r.detach(), rtol=1e-5, atol=1e-6)
    for name, mine in (("exp_avg", exp_avgs), ("exp_avg_sq", exp_avg_sqs)):
        for m, r in zip(mine, ref):
            torch.testing.assert_close(m, torch_opt.state[r][name], rtol=1e-5, atol=1e-7)
    assert [s.item() for s in steps] == [3.0] * len(shapes)

    before = [p.clone() for p in params]
    adamw_step_(params, grads, exp_avgs, exp_avg_sqs, steps, found_inf=torch.ones((), device=triton_device), block=256,
                iters=4, **hyper)
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert [s.item() for s in steps] == [3.0] * len(shapes)  # a skipped step is not counted


def test_fused_torch_on_cpu_is_an_error_and_auto_keeps_torch_adamw_there():
    net = nn.Linear(4, 4)
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        build_optimizer(net, OptimConfig(fused="torch"), torch.device("cpu"))
    assert type(build_optimizer(net, OptimConfig(), torch.device("cpu"))) is torch.optim.AdamW
    with pytest.raises(ConfigError, match="adamw only"):
        OptimConfig(name="lion", fused="torch")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.LayerNorm(128), nn.Linear(128, 32)).cuda()


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, clip_to: float | None = None) -> None:
    g = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 64, device="cuda", generator=g)
        model(x).square().mean().backward()
        if clip_to is not None:  # as hasten's loop clips a fused step: the divisor as GradScaler's grad_scale
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
            opt.grad_scale = ((norm + 1e-6) / clip_to).clamp(min=1.0)
            opt.found_inf = (~torch.isfinite(norm)).float()
        opt.step()
        for name in ("grad_scale", "found_inf"):
            if hasattr(opt, name):
                delattr(opt, name)
        opt.zero_grad(set_to_none=True)


@gpu
def test_optimizer_follows_torch_fused_adamw_and_their_checkpoints_swap():
    hyper = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours, theirs = _net(), _net()
    opt_ours, opt_theirs = TritonAdamW(ours.parameters(), **hyper), torch.optim.AdamW(theirs.parameters(), fused=True,
                                                                                     **hyper)
    _train(ours, opt_ours, 5, clip_to=0.5)
    _train(theirs, opt_theirs, 5, clip_to=0.5)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    state = copy.deepcopy(opt_theirs.state_dict())  # (a state dict holds the optimizer's own tensors)
    opt_ours.load_state_dict(state)  # torch's fused state resumes here, and the other way round
    opt_theirs.load_state_dict(copy.deepcopy(opt_ours.state_dict()))
    _train(ours, opt_ours, 3)
    _train(theirs, opt_theirs, 3)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert all(s["step"].item() == 8 and s["step"].is_cuda for s in opt_ours.state.values())


@gpu
def test_a_tensor_the_kernel_cannot_take_sends_the_step_to_torch_fused_kernel():
    model = nn.Linear(5, 3).cuda()  # 15 and 3 elements: not multiples of 16
    opt = TritonAdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 5, device="cuda")).sum().backward()
    assert not opt._applies()
    opt.step()
    assert all(opt.state[p]["step"].item() == 1 for p in model.parameters())


@gpu
def test_build_picks_the_triton_step_on_cuda_unless_torch_is_asked():
    model = _net()
    assert type(build_optimizer(model, OptimConfig(), torch.device("cuda"))) is TritonAdamW
    assert type(build_optimizer(model, OptimConfig(fused="torch"), torch.device("cuda"))) is torch.optim.AdamW
