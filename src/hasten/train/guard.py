"""Guards: skip non-finite steps without a host sync where possible; stop cleanly on signals."""

from __future__ import annotations

import math
import signal
import threading
from types import FrameType

import torch
from torch.distributed.tensor import DTensor


def step_if_finite(optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor,
                   scaler: torch.amp.GradScaler | None, clip_to: float = math.inf) -> torch.Tensor:
    """Apply the optimizer step unless the gradient norm is non-finite; return the skip flag (0-d).

    A non-finite loss gives non-finite gradients, so the norm catches both. Fused optimizers
    accept a device-side `found_inf` flag and skip inside the kernel (no host sync, as GradScaler
    uses them); other optimizers need the flag on the host, which on CPU costs nothing.
    A finite `clip_to` clips the gradient to that norm inside the fused kernel, through the divisor
    it applies to every gradient (GradScaler's `grad_scale`): the same update as clipping first,
    without a pass over the gradients (see `clips_in_step`).
    """
    found_inf = (~torch.isfinite(grad_norm)).float()
    if scaler is not None:
        scaler.step(optimizer)  # GradScaler has found the same infs while unscaling
        scaler.update()
    elif getattr(optimizer, "_step_supports_amp_scaling", False):
        # clip_grads_with_norm_ multiplies by min(max_norm / (norm + 1e-6), 1): divide by its inverse
        divisor = ((grad_norm + 1e-6) / clip_to).clamp(min=1.0) if math.isfinite(clip_to) else None
        optimizer.grad_scale, optimizer.found_inf = divisor, found_inf
        optimizer.step()
        del optimizer.grad_scale, optimizer.found_inf
    elif not bool(found_inf):
        optimizer.step()
    return found_inf


def clips_in_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                  params: list[torch.nn.Parameter]) -> bool:
    """Whether `step_if_finite` can clip inside the optimizer's kernel: a fused optimizer (one that
    takes GradScaler's divisor), no GradScaler (whose own divisor it would take instead) and plain
    tensors (sharded DTensor gradients are clipped apart)."""
    return (scaler is None and getattr(optimizer, "_step_supports_amp_scaling", False)
            and not any(isinstance(p, DTensor) for p in params))


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks once per step (save, then exit 0).

    A second SIGINT while stopping raises KeyboardInterrupt, so a user can still force-quit.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
