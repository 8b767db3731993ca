"""Output head + cross-entropy in chunks of tokens, without the full logits tensor.

    loss = linear_cross_entropy(h_ND, weight_VD, targets_N)        # == linear_cross_entropy_ref(...)

A language model's logits are tokens x vocabulary: at batch 8 x 2048 and a 32k vocabulary they
hold 0.5 G numbers, and the plain head + `F.cross_entropy` keeps them (and, in backward, their
gradient) alive at once. Here the head runs on chunks of tokens; each chunk's gradient with
respect to the hidden states (and to the head weight, if it trains) is computed right away in the
forward pass, while its logits are at hand, the way Liger-Kernel's fused linear cross-entropy
does, so at most one chunk of logits exists at a time. The FLOPs are the usual ones (head forward
2·N·D·V, its two backward matmuls 4·N·D·V): nothing is recomputed. Backward only scales the
stored gradients by the incoming one.

Without gradients (evaluation), only the loss is computed, chunk by chunk.

Matmuls run in the autocast dtype when autocast is on (as the plain head would), the softmax and
the loss in fp32. Targets equal to `ignore_index` count neither in the loss nor in its mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 2**27  # logits per chunk (tokens x vocabulary): 256 MiB in bf16


def chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk: about CHUNK_ELEMENTS logits, a multiple of 256, at least 256."""
    return max(256, CHUNK_ELEMENTS // vocab_size // 256 * 256)


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    return torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, weight_VD, targets_N, ignore_index: int, chunk: int, dtype: torch.dtype):
        n_valid = (targets_N != ignore_index).sum().clamp(min=1)
        w = weight_VD.to(dtype)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss = torch.zeros((), device=h_ND.device, dtype=torch.float32)
        grad_h = torch.empty_like(h_ND) if need_h else None
        grad_w = torch.zeros(weight_VD.shape, device=weight_VD.device, dtype=torch.float32) if need_w else None
        for start in range(0, h_ND.shape[0], chunk):
            h = h_ND[start:start + chunk].to(dtype)
            y = targets_N[start:start + chunk]
            logits = (h @ w.T).float()
            valid = y != ignore_index
            safe_y = torch.where(valid, y, 0)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe_y[:, None]).squeeze(1)
            loss = loss + torch.where(valid, lse - picked, 0.0).sum()
            if need_h or need_w:
                # d(loss)/d(logits) = (softmax - onehot) / n_valid on the counted rows, 0 elsewhere
                grad = torch.exp(logits - lse[:, None])
                grad.scatter_add_(1, safe_y[:, None], torch.full_like(lse[:, None], -1.0))
                grad = (grad * (valid[:, None] / n_valid)).to(dtype)
                if need_h:
                    grad_h[start:start + chunk] = (grad @ w).to(h_ND.dtype)
                if need_w:
                    grad_w += (grad.T @ h).float()
        ctx.weight_dtype = weight_VD.dtype
        ctx.save_for_backward(grad_h, grad_w)
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        grad_w = (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
        return grad_h, grad_w, None, None, None, None


def linear_cross_entropy(h_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX, chunk: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of `h_ND @ weight_VD.T` against `targets_N`, in chunks of tokens."""
    chunk = chunk or chunk_tokens(weight_VD.shape[0])
    dtype = _compute_dtype(h_ND)
    if not (torch.is_grad_enabled() and (h_ND.requires_grad or weight_VD.requires_grad)):
        return _loss_only(h_ND, weight_VD, targets_N, ignore_index, chunk, dtype)
    return _LinearCrossEntropy.apply(h_ND, weight_VD, targets_N, ignore_index, chunk, dtype)


def _loss_only(h_ND, weight_VD, targets_N, ignore_index, chunk, dtype) -> torch.Tensor:
    w = weight_VD.to(dtype)
    total = torch.zeros((), device=h_ND.device, dtype=torch.float32)
    for start in range(0, h_ND.shape[0], chunk):
        logits = (h_ND[start:start + chunk].to(dtype) @ w.T).float()
        total = total + F.cross_entropy(logits, targets_N[start:start + chunk], ignore_index=ignore_index,
                                        reduction="sum")
    return total / (targets_N != ignore_index).sum().clamp(min=1)


def linear_cross_entropy_ref(h_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                             ignore_index: int = IGNORE_INDEX, chunk: int | None = None) -> torch.Tensor:
    """The plain head + cross-entropy that `linear_cross_entropy` equals (chunk is unused)."""
    logits = F.linear(h_ND, weight_VD)
    return F.cross_entropy(logits.float(), targets_N, ignore_index=ignore_index)
