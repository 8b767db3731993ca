"""Mixed precision: autocast for the forward/backward pass, loss scaling for fp16.

Weights and optimizer states stay fp32 (the "master" copy); autocast runs matmuls in bf16/fp16.
bf16 has fp32's exponent range and needs no loss scaling. fp16 does: small gradients underflow,
so the loss is multiplied by a scale that GradScaler adapts, skipping the steps that overflow.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from hasten.config import ConfigError, PrecisionConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """The resolved precision of a run on a given device."""

    name: str  # fp32 | bf16 | fp16
    device_type: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context every forward pass runs in; a no-op for fp32."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def resolve_precision(cfg: PrecisionConfig, device: torch.device) -> Precision:
    """Pick the precision: `auto` is bf16 on GPUs that support it and fp32 elsewhere."""
    name = cfg.dtype
    if name == "auto":
        name = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("precision.dtype='bf16' needs a GPU with bf16 support (Ampere or newer); use fp16 or fp32.")
    return Precision(name=name, device_type=device.type)


def make_grad_scaler(precision: Precision, cfg: PrecisionConfig) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16, None otherwise."""
    if precision.name != "fp16":
        return None
    return torch.amp.GradScaler(precision.device_type, init_scale=cfg.loss_scale_init,
                                growth_interval=cfg.loss_scale_growth_interval)
