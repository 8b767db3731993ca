"""Guards: skip non-finite steps without a host sync where possible; stop cleanly on signals."""

from __future__ import annotations

import signal
import threading
from types import FrameType

import torch


def step_if_finite(optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor,
                   scaler: torch.amp.GradScaler | None) -> torch.Tensor:
    """Apply the optimizer step unless the gradient norm is non-finite; return the skip flag (0-d).

    A non-finite loss gives non-finite gradients, so the norm catches both. Fused optimizers
    accept a device-side `found_inf` flag and skip inside the kernel (no host sync, as GradScaler
    uses them); other optimizers need the flag on the host, which on CPU costs nothing.
    """
    found_inf = (~torch.isfinite(grad_norm)).float()
    if scaler is not None:
        scaler.step(optimizer)  # GradScaler has found the same infs while unscaling
        scaler.update()
    elif getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.grad_scale, optimizer.found_inf = None, found_inf
        optimizer.step()
        del optimizer.found_inf
    elif not bool(found_inf):
        optimizer.step()
    return found_inf


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
