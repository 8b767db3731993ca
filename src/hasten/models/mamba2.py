"""Mamba-2 sequence mixer with the SSD (state-space duality) scan in plain PyTorch.

The selective state-space recurrence, per head h with a scalar decay (Dao & Gu 2024, "Transformers
are SSMs", arXiv:2405.21060):
    state_t = exp(dt_t * A_h) * state_{t-1} + dt_t * x_t ⊗ B_t        state: (P, N)
    y_t     = state_t · C_t + D_h * x_t
`ssd_scan` computes it in chunks of Q steps: inside a chunk it is a masked matmul (attention-like,
with decays exp(segment sums of dt*A) as the mask); between chunks only the (P, N) states are
passed on, with the chunk's total decay. `ssd_scan_ref` is the plain step-by-step loop and
`ssd_step` one step of it, which generation uses with a cached state.

Shape legend:
    B batch, T sequence, L padded length, c chunks, Q chunk length, H heads, P head size,
    G groups of heads sharing B/C, N state size, D model width, E inner width (= H*P), K conv width.
    x_BTHP  inputs;  dt_BTH  step sizes (> 0);  A_H  decays (< 0);  B_BTGN, C_BTGN  in/out projections.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """(..., Q) -> (..., Q, Q): out[i, j] = a[j+1] + ... + a[i] for i >= j, -inf above the diagonal.
    Built from masked cumulative sums, not as a difference of cumsums, so it stays exact."""
    Q = a.shape[-1]
    a = a[..., None].expand(*a.shape, Q)  # [..., i, j] = a[i]
    strict = torch.tril(torch.ones(Q, Q, dtype=torch.bool, device=a.device), diagonal=-1)
    sums = a.masked_fill(~strict, 0).cumsum(dim=-2)
    lower = torch.tril(torch.ones(Q, Q, dtype=torch.bool, device=a.device))
    return sums.masked_fill(~lower, -math.inf)


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             chunk_size: int, initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD. x (B,T,H,P), dt (B,T,H), A (H), B and C (B,T,G,N), initial_state (B,H,P,N).
    Returns y (B,T,H,P) without the D skip, and the final state (B,H,P,N) in fp32.

    T need not divide by chunk_size: the tail is padded with dt = 0 (no decay, no input), which
    leaves the final state unchanged. Decays are computed in fp32; the matmuls run in the
    inputs' (or autocast's) dtype.
    """
    Bsz, T, H, P = x.shape
    G, N = B.shape[2], B.shape[-1]
    R, Q = H // G, chunk_size  # heads per group share their group's B and C
    pad = (-T) % Q
    if pad:
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    c = x.shape[1] // Q
    xdt = x * dt[..., None].to(x.dtype)  # discretized input
    x_bcqhp = xdt.reshape(Bsz, c, Q, H, P)
    B_bcqgn, C_bcqgn = B.reshape(Bsz, c, Q, G, N), C.reshape(Bsz, c, Q, G, N)
    a_bhcq = (dt.float() * A.float()).reshape(Bsz, c, Q, H).permute(0, 3, 1, 2)
    a_cum = a_bhcq.cumsum(dim=-1)
    # B and C are never copied out to every head: products with them run per group, and the
    # per-head decays multiply x, the scores or the outputs instead.

    # 1. inside each chunk: y_i = sum_{j<=i} C_i·B_j exp(a_{j+1..i}) x_j   (a masked "attention")
    cb_bgcij = torch.einsum("bcign,bcjgn->bgcij", C_bcqgn, B_bcqgn)  # once per group, not per head
    # exp(a_{j+1..i}) = exp(a_cum_i - a_cum_j): inside a chunk the cumulative sums stay small enough
    # for their difference to be exact to fp32 (across chunks they do not: step 3 uses _segsum), and
    # the whole (Q, Q) decay is one element-wise pass.
    lower = torch.tril(torch.ones(Q, Q, dtype=torch.bool, device=x.device))
    gaps = (a_cum[..., :, None] - a_cum[..., None, :]).masked_fill(~lower, -math.inf)
    decay_bgrcij = torch.exp(gaps).to(x.dtype).view(Bsz, G, R, c, Q, Q)
    scores = (decay_bgrcij * cb_bgcij[:, :, None]).view(Bsz, H, c, Q, Q)
    y_diag = torch.einsum("bhcij,bcjhp->bcihp", scores, x_bcqhp)

    # 2. each chunk's own contribution to the state at its end
    to_end_bcqh = torch.exp(a_cum[..., -1:] - a_cum).to(x.dtype).permute(0, 2, 3, 1)
    x_end = (x_bcqhp * to_end_bcqh[..., None]).view(Bsz, c, Q, G, R, P)
    states_bhcf = torch.einsum("bcjgn,bcjgrp->bgrcpn", B_bcqgn, x_end).reshape(Bsz, H, c, P * N)

    # 3. pass states between chunks: state entering chunk z = sum_{k<z} decay(k -> z) * states_k, plus
    # the initial state's decay to z. chunk_decay's index 0 is the initial state, k+1 chunk k's; its
    # last row gives the final state. Chunk states stay (B, H, chunks, P*N) and the initial state is a
    # separate term, so the matmul's inner and row counts are the chunk count, not one more: with an
    # odd size the compiler pads the operands into new (B*H, chunks+pad, P*N) tensors, a slow copy.
    chunk_decay = torch.exp(_segsum(F.pad(a_cum[..., -1], (1, 0)))).to(states_bhcf.dtype)  # (B, H, c+1, c+1)
    entering_bhcf = chunk_decay[..., :-1, 1:] @ states_bhcf
    final_bhf = (chunk_decay[..., -1:, 1:] @ states_bhcf)[:, :, 0]
    if initial_state is not None:
        init_bhf = initial_state.reshape(Bsz, H, 1, P * N).to(states_bhcf.dtype)
        entering_bhcf = entering_bhcf + chunk_decay[..., :-1, :1] * init_bhf
        final_bhf = final_bhf + chunk_decay[..., -1, :1] * init_bhf[:, :, 0]
    final_state = final_bhf.view(Bsz, H, P, N)

    # 4. what the entering state adds to each position of its chunk
    from_start_bcqh = torch.exp(a_cum).to(x.dtype).permute(0, 2, 3, 1)
    y_off = torch.einsum("bcign,bgrcpn->bcigrp", C_bcqgn, entering_bhcf.to(x.dtype).view(Bsz, G, R, c, P, N))
    y_off = y_off.reshape(Bsz, c, Q, H, P) * from_start_bcqh[..., None]
    y = (y_diag + y_off).reshape(Bsz, c * Q, H, P)[:, :T]
    return y, final_state.float()


def ssd_step(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
             C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the recurrence. state (B,H,P,N) fp32, x (B,H,P), dt (B,H), B and C (B,G,N).
    Returns y (B,H,P) without the D skip, and the new state."""
    H = x.shape[1]
    B_, C_ = B.repeat_interleave(H // B.shape[1], dim=1).float(), C.repeat_interleave(H // C.shape[1], dim=1).float()
    dt = dt.float()
    decay = torch.exp(dt * A.float())[..., None, None]
    state = state * decay + (dt[..., None] * x.float())[..., None] * B_[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", state, C_)
    return y.to(x.dtype), state


def ssd_scan_ref(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 chunk_size: int = 0, initial_state: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: `ssd_step` over every position in turn (chunk_size is ignored)."""
    Bsz, T, H, P = x.shape
    state = initial_state.float() if initial_state is not None else \
        torch.zeros(Bsz, H, P, B.shape[-1], device=x.device, dtype=torch.float32)
    ys = []
    for t in range(T):
        y, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t])
        ys.append(y)
    return torch.stack(ys, dim=1), state


def causal_conv(x_BTC: torch.Tensor, weight_C1K: torch.Tensor, bias_C: torch.Tensor | None) -> torch.Tensor:
    """Causal depthwise convolution over time, channels last: out_t = sum_k w_k x_{t-K+1+k} + b.
    The same numbers as `nn.Conv1d(C, C, K, groups=C, padding=K-1)` on (B, C, T) cut to T, written
    as K shifted multiply-adds: under torch.compile they fuse into one element-wise pass, with no
    transposes and no grouped-convolution kernel (slow for depthwise, above all its backward)."""
    K, T = weight_C1K.shape[-1], x_BTC.shape[1]
    padded = F.pad(x_BTC, (0, 0, K - 1, 0))
    w_KC = weight_C1K[:, 0].t().to(x_BTC.dtype)
    out = padded[:, :T] * w_KC[0]
    for k in range(1, K):
        out = out + padded[:, k:k + T] * w_KC[k]
    return out + bias_C.to(x_BTC.dtype) if bias_C is not None else out


def _gated_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    dtype = torch.promote_types(y.dtype, torch.float32)
    g = (y.to(dtype) * F.silu(z.to(dtype))).unflatten(-1, (groups, -1))
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return (g.flatten(-2) * weight.to(dtype)).to(y.dtype)


def gated_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    """RMSNorm(y * silu(z)) over each of `groups` equal slices of the last axis, then the gain;
    computed in fp32 (fp64 for fp64 inputs), returned in y's dtype.

    Checkpointed: the backward keeps y and z in their own dtype and recomputes the rest. Plain
    autograd, and torch.compile's partitioner left to itself, keep two fp32 tensors of the inner
    width per token instead (z upcast for the SiLU, the normalized product): a quarter of what a
    compiled Mamba-2 mixer saved for backward, written in forward and read back in backward."""
    return checkpoint(_gated_rms_norm, y, z, weight, groups, eps, use_reentrant=False)


class Mamba2(nn.Module):
    """Mamba-2 mixer: in_proj -> [z | x B C | dt], causal depthwise conv + SiLU on x B C, SSD scan
    with a D skip, gated RMSNorm with z, out_proj. `rope` is accepted and ignored (no positions
    needed: the recurrence is ordered). With a `cache` dict it fills the conv and SSM states on a
    prompt and continues from them one token at a time.

    With `recompute`, training keeps only the in-projection's output for the convolution and the
    scan, and runs them (conv, SiLU, step sizes, SSD scan, D skip) again in backward: the padded conv
    input, the conv output, the copies of x in the scan's layouts, the chunk states and the in-chunk
    scores are not kept (the gated norm already recomputes its own work). It costs one more forward
    of the conv and the scan."""

    def __init__(self, dim: int, d_state: int = 64, head_dim: int = 64, expand: int = 2, n_groups: int = 1,
                 chunk_size: int = 64, d_conv: int = 4, dt_min: float = 1e-3, dt_max: float = 0.1,
                 norm_eps: float = 1e-5, recompute: bool = False) -> None:
        super().__init__()
        inner = expand * dim
        if inner % head_dim or (inner // head_dim) % n_groups:
            raise ValueError(f"expand*dim={inner} must divide by head_dim={head_dim} into heads that divide by n_groups={n_groups}")
        self.inner, self.n_heads, self.head_dim = inner, inner // head_dim, head_dim
        self.d_state, self.n_groups, self.chunk_size, self.d_conv = d_state, n_groups, chunk_size, d_conv
        self.dt_min, self.dt_max, self.norm_eps, self.recompute = dt_min, dt_max, norm_eps, recompute
        self.conv_dim = inner + 2 * n_groups * d_state
        self.in_proj = nn.Linear(dim, inner + self.conv_dim + self.n_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1)
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        self.norm_weight = nn.Parameter(torch.empty(inner))
        self.out_proj = nn.Linear(inner, dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A in [-16, -1], dt log-uniform in [dt_min, dt_max] (through the softplus), D = 1 (as Mamba-2)."""
        with torch.no_grad():
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
            log_dt = torch.empty_like(self.dt_bias).uniform_(math.log(self.dt_min), math.log(self.dt_max))
            dt = log_dt.exp().clamp(min=1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            self.D.fill_(1.0)
            self.norm_weight.fill_(1.0)

    def scan_flops_per_token(self) -> int:
        """Training FLOPs of the SSD scan per token (forward + backward = 3x forward), beyond the
        projections: per head Q*(N+P) for the in-chunk matmuls and 2*N*P for the states."""
        Q, N, P = self.chunk_size, self.d_state, self.head_dim
        return 6 * self.n_heads * (Q * (N + P) + 2 * N * P)

    def _split(self, xbc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        GN = self.n_groups * self.d_state
        x, B, C = xbc.split([self.inner, GN, GN], dim=-1)
        return (x.unflatten(-1, (self.n_heads, self.head_dim)), B.unflatten(-1, (self.n_groups, self.d_state)),
                C.unflatten(-1, (self.n_groups, self.d_state)))

    def forward(self, x_BTD: torch.Tensor, rope: object = None, cache: dict | None = None) -> torch.Tensor:
        if cache is not None and "ssm" in cache:
            if x_BTD.shape[1] != 1:
                raise ValueError("a filled Mamba-2 cache continues one token at a time")
            return self.step(x_BTD, cache)
        T = x_BTD.shape[1]
        z, xbc, dt = self.in_proj(x_BTD).split([self.inner, self.conv_dim, self.n_heads], dim=-1)
        if self.recompute and cache is None and torch.is_grad_enabled():
            y = checkpoint(self._scan, xbc, dt, use_reentrant=False)[0]
        else:
            y, state = self._scan(xbc, dt)
            if cache is not None:  # the last K-1 conv inputs and the final SSM state
                cache["conv"] = F.pad(xbc.transpose(1, 2), (max(0, self.d_conv - 1 - T), 0))[..., -(self.d_conv - 1):]
                cache["ssm"] = state
        return self._out(y, z)

    def _scan(self, xbc: torch.Tensor, dt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Conv + SiLU, step sizes, SSD scan and D skip: y (B,T,H,P) and the final state."""
        x, B, C = self._split(F.silu(causal_conv(xbc, self.conv1d.weight, self.conv1d.bias)))
        dt = F.softplus(dt.float() + self.dt_bias.float())
        y, state = ssd_scan(x, dt, -torch.exp(self.A_log.float()), B, C, self.chunk_size)
        return self._skip(y, x), state

    def _skip(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return y + x * self.D.to(x.dtype)[:, None]

    def _out(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = gated_rms_norm(y.flatten(-2), z, self.norm_weight, self.n_groups, self.norm_eps)
        return self.out_proj(y)

    def step(self, x_B1D: torch.Tensor, cache: dict) -> torch.Tensor:
        """One token from the cached conv window and SSM state (updated in place in `cache`)."""
        z, xbc, dt = self.in_proj(x_B1D[:, 0]).split([self.inner, self.conv_dim, self.n_heads], dim=-1)
        window = torch.cat([cache["conv"], xbc[..., None]], dim=-1)  # (B, conv_dim, K)
        cache["conv"] = window[..., 1:]
        xbc = F.silu((window * self.conv1d.weight[:, 0]).sum(-1) + self.conv1d.bias)
        x, B, C = self._split(xbc)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        y, cache["ssm"] = ssd_step(cache["ssm"], x, dt, -torch.exp(self.A_log.float()), B, C)
        return self._out(self._skip(y, x), z)[:, None]
