"""The two optional capabilities an optimizer can have that the training loop honours.

The loop never asks which optimizer it runs; it asks what the optimizer can do:

    Curvature (SophiaG): `needs_hessian(step) -> bool` and `update_hessian(batch_size, grad_scale)`.
        After optimizer step `step`, when `needs_hessian(step)` is true, the loop runs one extra
        forward/backward of the run's `sampled_loss_fn` (labels sampled from the model's own
        predictions) on that step's first micro-batch, calls `update_hessian`, and clears the
        gradients. The cost falls inside the step, so tokens/s and wall time include it.

    Diagnostics (SophiaG): `metrics() -> dict[str, torch.Tensor]`, 0-d tensors the loop reads and
        logs with the loss at every log step (their host sync falls there, not in the step).

    Separate evaluation weights (schedule-free): `train()` and `eval()`.
        The loop calls `eval()` before evaluating and checkpointing and `train()` after, so
        validation loss and saved weights are the averaged point x, and it leaves the optimizer in
        eval mode at the end so the trained model holds x.

And the learning rate: `set_learning_rate` gives each group `lr_scale` (default 1) times the
scheduled rate, writing in place where a group holds its rate as a tensor (torchao's 8-bit AdamW).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class CurvatureOptimizer(Protocol):
    def needs_hessian(self, step: int) -> bool: ...

    def update_hessian(self, batch_size: int, grad_scale: float = 1.0) -> None: ...


def wants_hessian(optimizer: torch.optim.Optimizer, step: int) -> bool:
    """True when the optimizer keeps a curvature estimate and it is due after step `step`."""
    return isinstance(optimizer, CurvatureOptimizer) and optimizer.needs_hessian(step)


def optimizer_metrics(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The optimizer's own diagnostics, read now (empty for optimizers without `metrics()`)."""
    metrics = getattr(optimizer, "metrics", None)
    return {name: float(value) for name, value in metrics().items()} if callable(metrics) else {}


def has_eval_mode(optimizer: torch.optim.Optimizer) -> bool:
    return callable(getattr(optimizer, "eval", None)) and callable(getattr(optimizer, "train", None))


def set_train_mode(optimizer: torch.optim.Optimizer, training: bool) -> None:
    """Put an optimizer with separate evaluation weights in train or eval mode (others: no-op)."""
    if has_eval_mode(optimizer):
        optimizer.train() if training else optimizer.eval()
        # Switching reads `optimizer.state[p]`, which creates empty entries for parameters without
        # state yet; drop them, or DCP's get_state_dict takes the state as initialized and saves nothing.
        for param in [p for p, state in optimizer.state.items() if not state]:
            del optimizer.state[param]


@contextlib.contextmanager
def evaluation_weights(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """The model holds the optimizer's evaluation weights inside the block (a no-op for most)."""
    set_train_mode(optimizer, False)
    try:
        yield
    finally:
        set_train_mode(optimizer, True)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's rate to its `lr_scale` (default 1) times `lr`."""
    for group in optimizer.param_groups:
        value = lr * group.get("lr_scale", 1.0)
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)
        else:
            group["lr"] = value


def closure_loss(closure: Callable[[], Any] | None) -> Any:
    """The torch.optim closure protocol: re-evaluate the loss with gradients on, if a closure is given."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
