"""FlashAttention-4 (the flash-attn-4 package) in the shape PyTorch's SDPA registry calls it.

`torch.nn.attention`'s FA4 entry imports a module with `_flash_attn_fwd` returning `(out, lse)`
and `_flash_attn_bwd` returning `(dq, dk, dv)`; flash-attn-4's own forward returns more
(the attention probabilities and row statistics some callers ask for, else None), so this
module keeps the first two. Imported only with `train.attention_backend=fa4`.
"""

from __future__ import annotations

import torch
from flash_attn.cute import interface

_flash_attn_bwd = interface._flash_attn_bwd


def _flash_attn_fwd(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = interface._flash_attn_fwd(*args, **kwargs)[:2]
    return out, lse
