"""Expert SwiGLU over token groups: one grouped GEMM per matrix instead of one GEMM per expert.

Tokens arrive sorted by expert in a buffer where expert e owns rows [offs[e-1], offs[e]) and each
group starts on a multiple of GROUP_ALIGN rows (the grouped kernel's backward needs 16-byte
aligned groups). Rows past offs[-1] are padding and their output is undefined.

Shape legend: R buffer rows, D model width, F expert hidden width, E experts.
    x_RD  sorted tokens;  offs_E  int32 cumulative group ends;  w1_EFD, w3_EFD gate/up;  w2_EDF down.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GROUP_ALIGN = 16  # rows; 16 bf16 values = 32 bytes, enough for the weight-gradient GEMM's K dimension

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_available(x: torch.Tensor) -> bool:
    """The grouped kernel exists in this torch, runs on CUDA (Hopper or newer), and x is bf16."""
    return (_GROUPED_MM is not None and x.is_cuda and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device)[0] >= 9)


def expert_swiglu(x_RD: torch.Tensor, offs_E: torch.Tensor, w1_EFD: torch.Tensor, w3_EFD: torch.Tensor,
                  w2_EDF: torch.Tensor) -> torch.Tensor:
    """w2_e(silu(w1_e x) * w3_e x) for each row x of expert e's group, with grouped GEMMs in bf16.
    Gate and up run as one GEMM over their stacked weights (E, 2F, D): one wider kernel forward,
    and in backward one GEMM for the input's gradient instead of two and a sum."""
    F_ = w1_EFD.shape[1]
    w13_EDF2 = torch.cat([w1_EFD, w3_EFD], dim=1).to(torch.bfloat16).transpose(-2, -1)
    gate_RF, up_RF = _GROUPED_MM(x_RD, w13_EDF2, offs=offs_E).split(F_, dim=-1)
    return _GROUPED_MM(F.silu(gate_RF) * up_RF, w2_EDF.to(torch.bfloat16).transpose(-2, -1), offs=offs_E)


def expert_swiglu_ref(x_RD: torch.Tensor, offs_E: torch.Tensor, w1_EFD: torch.Tensor, w3_EFD: torch.Tensor,
                      w2_EDF: torch.Tensor) -> torch.Tensor:
    """The same with one plain matmul per expert group (reads offs on the host: one sync)."""
    out_RD = torch.zeros_like(x_RD)
    start = 0
    for e, end in enumerate(offs_E.tolist()):
        if end > start:
            x = x_RD[start:end]
            h = F.silu(x @ w1_EFD[e].to(x.dtype).T) * (x @ w3_EFD[e].to(x.dtype).T)
            out_RD[start:end] = h @ w2_EDF[e].to(x.dtype).T
        start = end
    return out_RD
