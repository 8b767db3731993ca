"""The optimizers `optim.name` can select: a small, typed, local registry.

Each entry names a builder `(model, OptimConfig, device) -> Optimizer` and what the rest of the
run must know about it. The conformance tests in tests/unit/test_optimizers.py are generated from
this table, so registering an optimizer registers its tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from hasten.config import OptimConfig

Builder = Callable[[nn.Module, OptimConfig, torch.device], torch.optim.Optimizer]


def _always_available(device: torch.device) -> str | None:
    return None


@dataclass(frozen=True)
class OptimizerSpec:
    """One selectable optimizer."""

    name: str
    build: Builder
    summary: str  # one line for docs and --help
    schedule_free: bool = False  # replaces the lr decay: the schedule keeps only the warmup
    unavailable: Callable[[torch.device], str | None] = _always_available  # why it cannot run here, or None


_REGISTRY: dict[str, OptimizerSpec] = {}


def register_optimizer(name: str, summary: str, *, schedule_free: bool = False,
                       unavailable: Callable[[torch.device], str | None] = _always_available
                       ) -> Callable[[Builder], Builder]:
    """Decorator registering a builder under `name`; a second registration of a name is an error."""
    def register(build: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"An optimizer named {name!r} is already registered.")
        _REGISTRY[name] = OptimizerSpec(name, build, summary, schedule_free, unavailable)
        return build
    return register


def optimizer_spec(name: str) -> OptimizerSpec:
    if name not in _REGISTRY:
        raise KeyError(f"No optimizer named {name!r}; registered: {', '.join(_REGISTRY)}.")
    return _REGISTRY[name]


def optimizer_names() -> list[str]:
    return list(_REGISTRY)
