"""The element-wise work around fused projections, on CUDA: one Triton kernel each way, every element
read and written once.

With q/k/v computed as one matmul (`x @ [Wq; Wk; Wv]^T`) and the SwiGLU's gate and up as another
(nanoGPT's `c_attn`, Megatron's `linear_fc1`), the matmuls run faster than three or two narrow ones,
but autograd then has to assemble one gradient of the fused output from its pieces. Under
torch.compile that concatenation becomes a masked kernel that evaluates every piece for every
element, and on the `gpt2-124m` step it cost more than the fused matmuls saved
(benchmarks/README.md). These two custom ops compute the pieces and their concatenation in one pass:

- `qkv_rope(qkv, cos, sin, H, K)`: from the fused output (B, T, (H + 2K) * d), the rotated queries
  and keys and a copy of the values, each (B, T, heads, d) contiguous; its backward writes the
  gradient of `qkv` from those of q, k and v (RoPE's inverse rotation on q and k).
- `swiglu(h)`: `silu(g) * u` for h = [g | u] (B, T, 2F); its backward writes [dg | du] in one pass.

Both compute in fp32 and round once to the input's dtype. The reference is the plain PyTorch of
`hasten.models.layers` (tests/unit/test_projections.py: on a GPU, or on the CPU under Triton's
interpreter); torch.compile treats the ops as opaque, so the kernels are the ones measured.

The fused layers' matmuls themselves go through `linear(x, W, b)` (an autograd function that
torch.compile traces): `F.linear`'s forward under autocast, with the fp32 weight's gradient written by
its GEMM in fp32, where autograd would make a bf16 gradient and cast it in a kernel of its own.
With train.gemm_kernel=quack, `swiglu_mlp` goes further and runs the SwiGLU inside QuACK's GEMM
epilogues (`_SwiGLUMLP`), so neither direction launches the `swiglu` kernel.
"""

from __future__ import annotations

import functools

import torch

from hasten.models.ops import triton_cross_entropy

# CUDA and Triton; decided once, at import, so that compiled forwards read a constant. Asked through
# torch.cuda.device_count(), which PyTorch answers from NVML where it can: torch.cuda.is_available()
# would start CUDA's driver here, and a process that imported hasten could then no longer fork
# children that use the GPU (a fork server that preloads hasten, say).
_AVAILABLE = torch.cuda.device_count() > 0 and triton_cross_entropy.triton_importable()


def available() -> bool:
    """True when a GPU is there and Triton imports; the callers keep the unfused layers otherwise."""
    return _AVAILABLE


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def qkv_rope_fwd(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, T, H: tl.constexpr, K: tl.constexpr,
                     HALF: tl.constexpr, HEADS: tl.constexpr, HALF_BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # one (batch, position) row: all its heads
        t = row % T
        D: tl.constexpr = 2 * HALF
        hh = tl.arange(0, HEADS)[:, None]  # both blocks padded to powers of two (Triton's shapes)
        j = tl.arange(0, HALF_BLOCK)[None, :]
        jm = j < HALF
        live = (hh < H + 2 * K) & jm
        src = qkv_ptr + row * (H + 2 * K) * D + hh * D + j
        x1 = tl.load(src, mask=live, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=live, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + t * D + j, mask=jm, other=0.0)
        s = tl.load(sin_ptr + t * D + j, mask=jm, other=0.0)
        rotate = hh < H + K  # queries and keys turn, values are copied
        y1 = tl.where(rotate, x1 * c - x2 * s, x1).to(q_ptr.dtype.element_ty)
        y2 = tl.where(rotate, x2 * c + x1 * s, x2).to(q_ptr.dtype.element_ty)
        is_q, is_k, is_v = (hh < H) & jm, (hh >= H) & (hh < H + K) & jm, (hh >= H + K) & live
        dq = q_ptr + row * H * D + hh * D + j
        dk = k_ptr + row * K * D + (hh - H) * D + j
        dv = v_ptr + row * K * D + (hh - H - K) * D + j
        tl.store(dq, y1, mask=is_q)
        tl.store(dq + HALF, y2, mask=is_q)
        tl.store(dk, y1, mask=is_k)
        tl.store(dk + HALF, y2, mask=is_k)
        tl.store(dv, y1, mask=is_v)
        tl.store(dv + HALF, y2, mask=is_v)

    @triton.jit
    def qkv_rope_bwd(dq_ptr, dk_ptr, dv_ptr, cos_ptr, sin_ptr, dqkv_ptr, T, H: tl.constexpr, K: tl.constexpr,
                     HALF: tl.constexpr, HEADS: tl.constexpr, HALF_BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        t = row % T
        D: tl.constexpr = 2 * HALF
        hh = tl.arange(0, HEADS)[:, None]  # both blocks padded to powers of two (Triton's shapes)
        j = tl.arange(0, HALF_BLOCK)[None, :]
        jm = j < HALF
        live = (hh < H + 2 * K) & jm
        is_q, is_k, is_v = (hh < H) & jm, (hh >= H) & (hh < H + K) & jm, (hh >= H + K) & live
        sq = dq_ptr + row * H * D + hh * D + j  # the three sources cover disjoint heads: their sum picks one
        sk = dk_ptr + row * K * D + (hh - H) * D + j
        sv = dv_ptr + row * K * D + (hh - H - K) * D + j
        g1 = (tl.load(sq, mask=is_q, other=0.0).to(tl.float32) + tl.load(sk, mask=is_k, other=0.0).to(tl.float32)
              + tl.load(sv, mask=is_v, other=0.0).to(tl.float32))
        g2 = (tl.load(sq + HALF, mask=is_q, other=0.0).to(tl.float32)
              + tl.load(sk + HALF, mask=is_k, other=0.0).to(tl.float32)
              + tl.load(sv + HALF, mask=is_v, other=0.0).to(tl.float32))
        c = tl.load(cos_ptr + t * D + j, mask=jm, other=0.0)
        s = tl.load(sin_ptr + t * D + j, mask=jm, other=0.0)
        rotate = hh < H + K  # the inverse rotation: the transpose of [[c, -s], [s, c]]
        dx1 = tl.where(rotate, g1 * c + g2 * s, g1).to(dqkv_ptr.dtype.element_ty)
        dx2 = tl.where(rotate, g2 * c - g1 * s, g2).to(dqkv_ptr.dtype.element_ty)
        dst = dqkv_ptr + row * (H + 2 * K) * D + hh * D + j
        tl.store(dst, dx1, mask=live)
        tl.store(dst + HALF, dx2, mask=live)

    @triton.jit
    def swiglu_fwd(h_ptr, y_ptr, F, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < F
        g = tl.load(h_ptr + row * 2 * F + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(h_ptr + row * 2 * F + F + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * F + cols, (g * tl.sigmoid(g) * u).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def swiglu_bwd(h_ptr, dy_ptr, dh_ptr, F, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < F
        g = tl.load(h_ptr + row * 2 * F + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(h_ptr + row * 2 * F + F + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * F + cols, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        dg = dy * u * (sig + silu * (1.0 - sig))  # d silu / dg = sig * (1 + g * (1 - sig))
        tl.store(dh_ptr + row * 2 * F + cols, dg.to(dh_ptr.dtype.element_ty), mask=mask)
        tl.store(dh_ptr + row * 2 * F + F + cols, (dy * silu).to(dh_ptr.dtype.element_ty), mask=mask)

    return dict(qkv_rope_fwd=qkv_rope_fwd, qkv_rope_bwd=qkv_rope_bwd, swiglu_fwd=swiglu_fwd, swiglu_bwd=swiglu_bwd)


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()  # the next power of two (Triton's block shapes)


@torch.library.custom_op("hasten::qkv_rope", mutates_args=())
def qkv_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int,
             n_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv (B, T, (H + 2K) * d), cos and sin (T, d) fp32 -> rotated q (B, T, H, d), rotated k and v (B, T, K, d)."""
    B, T, _ = qkv.shape
    H, K, d = n_heads, n_kv_heads, cos.shape[-1]
    q, k, v = qkv.new_empty(B, T, H, d), qkv.new_empty(B, T, K, d), qkv.new_empty(B, T, K, d)
    _kernels()["qkv_rope_fwd"][(B * T,)](qkv.contiguous(), cos, sin, q, k, v, T, H, K, d // 2, _pow2(H + 2 * K),
                                         _pow2(d // 2))
    return q, k, v


@qkv_rope.register_fake
def _(qkv, cos, sin, n_heads, n_kv_heads):
    B, T, _ = qkv.shape
    d = cos.shape[-1]
    return qkv.new_empty(B, T, n_heads, d), qkv.new_empty(B, T, n_kv_heads, d), qkv.new_empty(B, T, n_kv_heads, d)


@torch.library.custom_op("hasten::qkv_rope_backward", mutates_args=())
def qkv_rope_backward(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> torch.Tensor:
    B, T, H, d = dq.shape
    K = dk.shape[2]
    dqkv = dq.new_empty(B, T, (H + 2 * K) * d)
    _kernels()["qkv_rope_bwd"][(B * T,)](dq.contiguous(), dk.contiguous(), dv.contiguous(), cos, sin, dqkv, T,
                                         H, K, d // 2, _pow2(H + 2 * K), _pow2(d // 2))
    return dqkv


@qkv_rope_backward.register_fake
def _(dq, dk, dv, cos, sin):
    B, T, H, d = dq.shape
    return dq.new_empty(B, T, (H + 2 * dk.shape[2]) * d)


def _qkv_rope_setup(ctx, inputs, output):
    _, cos, sin, _, _ = inputs
    ctx.save_for_backward(cos, sin)


def _qkv_rope_grad(ctx, dq, dk, dv):
    cos, sin = ctx.saved_tensors
    return qkv_rope_backward(dq, dk, dv, cos, sin), None, None, None, None


qkv_rope.register_autograd(_qkv_rope_grad, setup_context=_qkv_rope_setup)

_SWIGLU_BLOCK = 1024


@torch.library.custom_op("hasten::swiglu", mutates_args=())
def swiglu(h: torch.Tensor) -> torch.Tensor:
    """h = [gate | up] along the last axis (..., 2F) -> silu(gate) * up (..., F)."""
    F = h.shape[-1] // 2
    y = h.new_empty(*h.shape[:-1], F)
    rows = h.numel() // (2 * F)
    _kernels()["swiglu_fwd"][(rows, -(-F // _SWIGLU_BLOCK))](h.contiguous(), y, F, _SWIGLU_BLOCK)
    return y


@swiglu.register_fake
def _(h):
    return h.new_empty(*h.shape[:-1], h.shape[-1] // 2)


@torch.library.custom_op("hasten::swiglu_backward", mutates_args=())
def swiglu_backward(h: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    F = h.shape[-1] // 2
    dh = torch.empty_like(h, memory_format=torch.contiguous_format)
    rows = h.numel() // (2 * F)
    _kernels()["swiglu_bwd"][(rows, -(-F // _SWIGLU_BLOCK))](h.contiguous(), dy.contiguous(), dh, F, _SWIGLU_BLOCK)
    return dh


@swiglu_backward.register_fake
def _(h, dy):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _swiglu_grad(ctx, dy):
    (h,) = ctx.saved_tensors
    return swiglu_backward(h, dy)


swiglu.register_autograd(_swiglu_grad, setup_context=_swiglu_setup)


GEMM_KERNELS = ("auto", "quack", "cublas")
_gemm = "cublas"  # what `linear` runs its bf16 forward and input-gradient GEMMs with: cublas or quack
_gemm_tuned = True  # QuACK's autotuner on each shape's first call
_quack = None  # quack.gemm_interface, once set_gemm_kernel("quack") has imported it


def set_gemm_kernel(name: str, tuned: bool = True) -> None:
    """Process-wide, as PyTorch's matmul flags are (set for every run by hasten.train.build from
    train.gemm_kernel, "auto" already resolved): `cublas` (PyTorch's matmul) or `quack` (QuACK's
    CuTe-DSL GEMM, `torch.ops.quack.gemm`, which importing `quack.gemm_interface` registers).
    Read when torch.compile traces the layers, so set it before the first forward."""
    global _gemm, _gemm_tuned, _quack
    if name not in ("quack", "cublas"):
        raise ValueError(f"GEMM kernel must be quack or cublas, got {name!r}")
    if name == "quack":
        import quack.gemm_interface  # registers torch.ops.quack.gemm

        _quack = quack.gemm_interface
    _gemm, _gemm_tuned = name, tuned


def gemm_kernel() -> str:
    return _gemm


@functools.cache
def quack_gemm_error() -> str | None:
    """Why QuACK's GEMM cannot be imported (the package missing or broken), None when it can."""
    try:
        import quack.gemm_interface  # noqa: F401
    except Exception as err:  # a broken install must leave `auto` on cuBLAS, not stop the run
        return f"{type(err).__name__}: {err}"
    return None


def _matmul(a: torch.Tensor, b_KN: torch.Tensor) -> torch.Tensor:
    """a @ b (a of any leading dims, b 2-D) through the kernel `set_gemm_kernel` chose; QuACK's
    takes bf16 only, the rest stays on cuBLAS."""
    if _gemm != "quack" or a.dtype != torch.bfloat16:
        return a @ b_KN
    return torch.ops.quack.gemm(a.reshape(-1, a.shape[-1]), b_KN, tuned=_gemm_tuned).view(*a.shape[:-1], -1)


class _Linear(torch.autograd.Function):
    """x @ W^T in `dtype` (autocast's), the weight kept in its own wider dtype, with W's gradient
    made by its GEMM in that dtype (cuBLAS's fp32 output, `torch.mm(..., out_dtype=)`). The forward
    and input-gradient GEMMs go through `_matmul` (cuBLAS, or QuACK's under train.gemm_kernel)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
        x16, w16 = x.to(dtype), weight.to(dtype)
        ctx.save_for_backward(x16, w16)
        ctx.weight_dtype, ctx.bias_dtype = weight.dtype, None if bias is None else bias.dtype
        if bias is not None or _gemm == "cublas":
            return torch.nn.functional.linear(x16, w16, None if bias is None else bias.to(dtype))
        return _matmul(x16, w16.t())

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x16, w16 = ctx.saved_tensors
        dy16 = dy.to(w16.dtype)
        dx = _matmul(dy16, w16) if ctx.needs_input_grad[0] else None
        dy_NO = dy16.reshape(-1, dy16.shape[-1])
        dw = torch.mm(dy_NO.t(), x16.reshape(-1, x16.shape[-1]), out_dtype=ctx.weight_dtype) \
            if ctx.needs_input_grad[1] else None
        db = dy_NO.sum(0, dtype=torch.float32).to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return dx, dw, db, None


class _SwiGLUMLP(torch.autograd.Function):
    """w2(silu(x W1^T) * x W3^T) with the SwiGLU in QuACK's GEMM epilogues: the gate-and-up GEMM
    writes silu(g) * u beside its output, and the down projection's input-gradient GEMM reads that
    output back to write the gate-and-up gradient and silu(g) * u again (for W2's gradient), where
    the unfused path runs the Triton kernels of `swiglu` between the GEMMs and keeps silu(g) * u
    for backward. Weights as `_Linear` keeps them: fp32 masters, bf16 copies for the GEMMs, fp32
    gradients from cuBLAS's weight-gradient GEMMs.

    `w13` is [W1; W3] (2F, D), as the model concatenates it. QuACK's gated epilogue pairs adjacent
    columns, so the GEMMs read it through `concat_layout=("B",)` (gate and up interleaved on the
    fly) and the pre-activation they keep is interleaved, [g0, u0, g1, u1, ...]; W13's gradient
    made from it is put back in [W1; W3] order by one copy of its 2F x D values."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x16, w13_16, w2_16 = x.to(dtype), w13.to(dtype), w2.to(dtype)
        x_ND = x16.reshape(-1, x16.shape[-1])
        h_NG, y_NF = _quack.gemm_gated(x_ND, w13_16.t(), activation="swiglu", concat_layout=("B",),
                                       tuned=_gemm_tuned)
        out = _matmul(y_NF, w2_16.t())
        ctx.save_for_backward(x_ND, w13_16, w2_16, h_NG)
        ctx.weight_dtypes = w13.dtype, w2.dtype
        return out.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_ND, w13_16, w2_16, h_NG = ctx.saved_tensors
        dy_ND = dy.to(w2_16.dtype).reshape(-1, dy.shape[-1]).contiguous()
        dh_NG, y_NF = _quack.gemm_dgated(dy_ND, w2_16, h_NG, activation="swiglu", tuned=_gemm_tuned)
        dw2 = torch.mm(dy_ND.t(), y_NF, out_dtype=ctx.weight_dtypes[1])
        dx = _quack.gemm(dh_NG, w13_16, concat_layout=("B",), dynamic_scheduler=True, tuned=_gemm_tuned)
        dw13 = torch.mm(dh_NG.t(), x_ND, out_dtype=ctx.weight_dtypes[0])  # rows g0, u0, g1, u1, ...
        F, D = dw13.shape[0] // 2, dw13.shape[1]
        dw13 = dw13.view(F, 2, D).transpose(0, 1).reshape(2 * F, D)
        return dx.view(*dy.shape[:-1], -1), dw13, dw2, None


def swiglu_mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The fused SwiGLU feed-forward, x -> W2 (silu(g) * u) for [g | u] = x [W1; W3]^T: with
    train.gemm_kernel=quack under bf16 autocast, `_SwiGLUMLP` (the activation in the GEMMs'
    epilogues); otherwise `linear`, the `swiglu` kernel and `linear`."""
    if (_gemm == "quack" and x.is_cuda and torch.is_autocast_enabled("cuda")
            and torch.get_autocast_dtype("cuda") == torch.bfloat16):
        return _SwiGLUMLP.apply(x, w13, w2, torch.bfloat16)
    return linear(swiglu(linear(x, w13)), w2)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` for the fused layers on CUDA. Under autocast, with fp32 master weights, autograd's
    weight gradient is a bf16 GEMM output that a kernel of its own then casts to fp32 (four a block
    each step, plus their launches); here the GEMM writes it in fp32 (cuBLAS accumulates in fp32 either
    way, so the gradient is also no longer rounded to bf16 first). On an H200, at the GPT-2-124M
    shapes, each weight-gradient GEMM took 4-6 us less. Elsewhere (no autocast, or the weight already
    in autocast's dtype) it is `F.linear`."""
    if not (x.is_cuda and torch.is_autocast_enabled("cuda")):
        return torch.nn.functional.linear(x, weight, bias)
    dtype = torch.get_autocast_dtype("cuda")
    if weight.dtype == dtype:
        return torch.nn.functional.linear(x, weight, bias)
    return _Linear.apply(x, weight, bias, dtype)
