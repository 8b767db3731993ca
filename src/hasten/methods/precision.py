"""Mixed precision: autocast for the forward/backward pass, loss scaling for fp16.

Weights and optimizer states stay fp32 (the "master" copy); autocast runs matmuls in bf16/fp16.
bf16 has fp32's exponent range and needs no loss scaling. fp16 does: small gradients underflow,
so the loss is multiplied by a scale that GradScaler adapts, skipping the steps that overflow.
"""

from __future__ import annotations

import contextlib
import functools
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


def fp8_linears(model: torch.nn.Module) -> list[str]:
    """Names of the linears fp8 training converts: every nn.Linear but the output head (whose
    precision matters most for the loss, as torchtitan leaves it), with both dimensions multiples
    of 16 (what fp8 matmul kernels require)."""
    from hasten.optim.muon import output_head

    head = output_head(model)
    return [name for name, m in model.named_modules() if type(m) is torch.nn.Linear and m is not head
            and m.in_features % 16 == 0 and m.out_features % 16 == 0]


@functools.cache
def cpu_rowwise_fp8() -> bool:
    """Whether this PyTorch's CPU `torch._scaled_mm` takes row-wise scales, as the `rowwise` recipe's
    matmuls need (PyTorch 2.13's does; 2.11's takes one scale per tensor and fails an internal assert)."""
    try:
        a = torch.ones(16, 32).to(torch.float8_e4m3fn)
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except (RuntimeError, TypeError, AttributeError):
        return False
    return True


def convert_fp8(model: torch.nn.Module, recipe: str, device: torch.device) -> list[str]:
    """Swap the `fp8_linears` for torchao's Float8Linear (fp8 matmuls with dynamic scales in forward
    and backward, fp32 weights kept); returns their names. Refused on GPUs older than sm89, and the
    row-wise recipe on a CPU whose PyTorch cannot run it."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise ConfigError(f"precision.fp8={recipe} needs fp8 tensor cores (sm89+: Ada, Hopper); this GPU is "
                          f"sm{''.join(map(str, torch.cuda.get_device_capability(device)))}. Use precision.fp8=none.")
    if device.type == "cpu" and recipe == "rowwise" and not cpu_rowwise_fp8():
        raise ConfigError(f"precision.fp8=rowwise on the CPU needs row-wise scales in torch._scaled_mm, which the CPU "
                          f"build of PyTorch {torch.__version__} lacks (2.13 has them): use precision.fp8=tensorwise "
                          "there, or a GPU.")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as err:
        raise ConfigError(f"precision.fp8={recipe} needs torchao (pip install torchao): {err}") from None
    names = set(fp8_linears(model))
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe),
                               module_filter_fn=lambda module, fqn: fqn in names)
    return sorted(names)


def make_grad_scaler(precision: Precision, cfg: PrecisionConfig) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16, None otherwise."""
    if precision.name != "fp16":
        return None
    return torch.amp.GradScaler(precision.device_type, init_scale=cfg.loss_scale_init,
                                growth_interval=cfg.loss_scale_growth_interval)
