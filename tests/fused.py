"""A model built with a fusing key (model.fuse_projections, model.fuse_norms) against the same
model without it: same weights, same batch, bf16 autocast."""

from __future__ import annotations

from collections.abc import Callable

import torch

from hasten.config import load_config
from hasten.models import build_model


def fused_against_plain(plain: list[str], fused: list[str], loss_fn: Callable, compile: bool, loss_atol: float,
                        device: str = "cuda") -> tuple[torch.nn.Module, torch.Tensor]:
    """Builds both models from the default recipe with these overrides, runs `loss_fn(model, batch)`
    and its backward on each (compiled or not), and checks that the fused model's loss is within
    `loss_atol` of the plain one's and every gradient close to its counterpart. Returns the fused
    model and the batch."""
    cfgs = [load_config("default", overrides).model for overrides in (plain, fused)]
    torch.manual_seed(0)
    a = build_model(cfgs[0], 256, torch.device(device))
    b = build_model(cfgs[1], 256, torch.device(device))
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 256, (4, 64), device=device)
    results = []
    for model in (a, b):
        run = torch.compile(model) if compile else model
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = loss_fn(run, x)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (la, ga), (lb, gb) = results
    torch.testing.assert_close(lb, la, atol=loss_atol, rtol=0)
    for name, g in ga.items():
        torch.testing.assert_close(gb[name], g, atol=5e-3, rtol=5e-2, msg=lambda m: f"{name}: {m}")
    return b, x


def kernels_run(model: torch.nn.Module, x: torch.Tensor) -> str:
    """The names of the GPU kernels one forward of `model` under bf16 autocast launches."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(x)
    return " ".join(e.key for e in prof.key_averages())
