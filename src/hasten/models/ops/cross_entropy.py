"""Output head and cross-entropy a chunk of tokens at a time, never the whole (tokens x vocab) logits.

The plain loss keeps the logits (or what the compiler keeps of them) from forward to backward, and
backward then makes their gradient: two tensors of tokens x vocab, 1 GiB each in bf16 for 16k
tokens and a 32k vocabulary. Here each chunk's logits are made, turned into its loss and straight
into the gradients of the hidden states and of the head weight, and freed before the next chunk;
backward only scales the kept gradients by the loss's own. The matmuls are the ones forward and
backward run anyway, so nothing is recomputed (the fused linear cross-entropy of Liger-Kernel).

On CUDA (with Triton) each chunk's loss and logits' gradient come from one kernel that reads the
logits and overwrites them with their gradient (hasten.models.ops.triton_cross_entropy), between
the head's matmuls; elsewhere from the plain operations below. On Hopper, with the quack-kernels
package installed, QuACK's fused linear cross-entropy does the whole of it instead: the head's
GEMM writes the logits' exponentials with their row sums in its epilogue, and the two gradient
GEMMs turn them into softmax - one-hot as they load them, so the logits and their gradient never
make a separate pass through memory (train.loss_kernel; benchmarks/quack_kernels.py measures it).

The chunk loop runs outside torch.compile's graph, in Python, so each chunk's temporaries are
freed before the next one is made; each chunk's work is compiled on its own. (Traced into the
model's graph, the same loop let the compiler keep every chunk's logits alive at once: more
memory than the plain loss, measured on an H200.)

Shape legend: N tokens, D hidden width, V vocabulary, n tokens of one chunk.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch

IGNORE_INDEX = -100  # targets with this value add nothing (the prompt of instruction data)
FP16_WEIGHT_GRAD_TOKENS = 4096  # fp16: the head's weight gradient summed over this many tokens per matmul
QUACK_CHUNK = 8192  # QuACK's tokens per chunk at most: 4096 / 8192 / 16384 took 12.6 / 12.3 / 12.4 ms on an H200
KERNELS = ("auto", "quack", "triton", "torch")
_kernel = "auto"  # process-wide, as PyTorch's attention flags are; set for every run (hasten.train.build)
_last_used: str | None = None  # the kernel of the latest call, for the run's summary
_quack_failed = False  # set when a call through QuACK raised under `auto`: the other kernels from then on


def set_kernel(name: str) -> None:
    """What computes each chunk (train.loss_kernel): quack (QuACK's fused linear cross-entropy),
    triton (the head's matmuls around one Triton kernel), torch (compiled PyTorch operations), or
    auto: quack where `quack_available` and the call qualifies, else triton on CUDA, else torch."""
    global _kernel, _last_used
    if name not in KERNELS:
        raise ValueError(f"loss kernel must be one of {KERNELS}, got {name!r}")
    _kernel, _last_used = name, None


def last_kernel() -> str | None:
    """The kernel of the latest call since `set_kernel` (quack, triton or torch), None before any."""
    return _last_used


@functools.cache
def quack_import_error() -> str | None:
    """Why QuACK's linear cross-entropy cannot be imported (the package missing, or installed but
    failing at import, e.g. against an nvidia-cutlass-dsl it does not match), None when it can."""
    try:
        import quack.linear_cross_entropy  # noqa: F401
    except Exception as err:  # a broken install must leave `auto` on the other kernels, not stop the run
        return f"{type(err).__name__}: {err}"
    return None


@functools.cache
def quack_available(device_index: int) -> bool:
    """Whether QuACK's fused linear cross-entropy can run on this CUDA device: the GPU is a Hopper
    (compute capability 9.0, the kernels' target) and the quack-kernels package imports."""
    if torch.cuda.get_device_capability(device_index) != (9, 0):
        return False
    error = quack_import_error()
    if error is not None and "No module named 'quack'" not in error:
        warnings.warn(f"quack-kernels is installed but does not import ({error[:300]}); the output head and loss "
                      "run on the Triton kernel", stacklevel=2)
    return error is None


def _use_quack(h_ND: torch.Tensor, weight_VD: torch.Tensor, chunk: int, dtype: torch.dtype) -> bool:
    if _kernel == "quack":
        return True
    if _kernel != "auto" or not h_ND.is_cuda or dtype != torch.bfloat16:
        return False
    index = h_ND.device.index
    if not quack_available(torch.cuda.current_device() if index is None else index):
        return False
    from quack.linear_cross_entropy import scaled_exp_lce_supported

    return scaled_exp_lce_supported(h_ND, weight_VD, _quack_chunk(chunk), "sum")


def _quack_chunk(chunk: int) -> int:
    return max(128, min(chunk, QUACK_CHUNK) // 128 * 128)  # its kernels take chunks of a multiple of 128 tokens


def _quack_loss(h_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor, chunk: int) -> torch.Tensor:
    """The mean loss through QuACK: divided by the counted targets clamped to 1, so that a batch with
    none gives 0, as the other kernels do, not 0 / 0. Training calls QuACK's forward op with the
    division folded into its gradients and scales them by the loss's gradient here
    (_QuackLinearCrossEntropy); without gradients, or where that op is missing, QuACK's own function."""
    from quack.linear_cross_entropy import chunked_linear_cross_entropy

    chunk = _quack_chunk(chunk)
    if torch.is_grad_enabled() and (h_ND.requires_grad or weight_VD.requires_grad) and _quack_forward_op():
        return _QuackLinearCrossEntropy.apply(h_ND, weight_VD, targets_N, chunk)
    total = chunked_linear_cross_entropy(h_ND, weight_VD, targets_N, chunk_size=chunk, ignore_index=IGNORE_INDEX,
                                         reduction="sum")
    return total / (targets_N != IGNORE_INDEX).sum().clamp(min=1)


@functools.cache
def _quack_forward_op() -> bool:
    """Whether the installed QuACK registers the forward op _QuackLinearCrossEntropy calls (looked up once)."""
    return hasattr(torch.ops.quack, "lce_scaled_exp_fwd")


class _QuackLinearCrossEntropy(torch.autograd.Function):
    """QuACK's scaled-exp forward (one custom op: the per-row losses and the gradients of h and of
    the weight, with 1 / counted targets folded in, the weight's in fp32), and a backward that
    scales the two gradients by the loss's own with one Triton pass each (triton_cross_entropy.scale_;
    QuACK's backward multiplies by the device scalar in PyTorch, which does not vectorize: 0.21 ms
    a step at GPT-2-124M's shape on an H200, against 0.10)."""

    @staticmethod
    def forward(ctx, h_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor, chunk: int) -> torch.Tensor:
        grad_h, grad_w = ctx.needs_input_grad[:2]
        x_ND, w_VD = h_ND.to(torch.bfloat16), weight_VD.to(torch.bfloat16)
        if x_ND.stride(0) % 8:  # QuACK's TMA loads want 16-byte aligned rows
            x_ND = x_ND.contiguous()
        inv_count = (targets_N != IGNORE_INDEX).sum().clamp(min=1).float().reciprocal()
        outs = torch.ops.quack.lce_scaled_exp_fwd(x_ND, w_VD, targets_N, chunk, IGNORE_INDEX, grad_h, grad_w,
                                                  inv_count, None)
        N = x_ND.shape[0]  # QuACK pads the last chunk to 128 rows
        ctx.save_for_backward(outs[1][:N] if grad_h else None, outs[1 + grad_h] if grad_w else None)
        ctx.weight_dtype = weight_VD.dtype
        return outs[0][:N].sum() * inv_count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        return *_kept_gradients(ctx, grad_loss), None, None


def _kept_gradients(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The backward of both loss functions: the gradients of h and of the weight that forward kept
    (either may be None), times the loss's gradient, the weight's in its own dtype."""
    gh_ND, gw_VD = ctx.saved_tensors
    gh = _scale_kept(ctx, gh_ND, grad_loss) if gh_ND is not None else None
    gw = _scale_kept(ctx, gw_VD, grad_loss).to(ctx.weight_dtype) if gw_VD is not None else None
    ctx.backward_done = True  # a second backward (retain_graph) would find its gradients scaled
    return gh, gw


def _scale_kept(ctx, kept: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """A kept gradient times the loss's gradient: in place, one Triton pass, on CUDA (PyTorch's
    multiplication by a 0-d device tensor does not vectorize: see triton_cross_entropy.scale_);
    else a new tensor, the product in the wider of the two dtypes, rounded once."""
    from hasten.models.ops import triton_cross_entropy

    if not (kept.is_cuda and kept.is_contiguous() and triton_cross_entropy.available()):
        return (kept * grad_loss).to(kept.dtype)
    if getattr(ctx, "backward_done", False):
        raise RuntimeError("a second backward through the same linear cross-entropy (retain_graph=True) is not "
                           "supported on CUDA: the first scaled its kept gradients in place")
    return triton_cross_entropy.scale_(kept, grad_loss)


def _weight_grad(g_nV: torch.Tensor, h_nD: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """g_nV.T @ h_nD in `acc`. fp16 gradients arrive unscaled (see _LinearCrossEntropy): their sum
    over many tokens can pass fp16's 65504, so the matmul runs over blocks of tokens, summed in acc."""
    if g_nV.dtype != torch.float16:
        return (g_nV.t() @ h_nD).to(acc)
    n = FP16_WEIGHT_GRAD_TOKENS
    total = (g_nV[:n].t() @ h_nD[:n]).to(acc)
    for start in range(n, g_nV.shape[0], n):
        total = total.add_(g_nV[start:start + n].t() @ h_nD[start:start + n])
    return total


def _chunk(h_nD: torch.Tensor, w_VD: torch.Tensor, t_n: torch.Tensor, scale: torch.Tensor, grad_h: bool,
           grad_w: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One chunk: (summed loss, d loss / d h_nD, d loss / d w_VD), the gradients of the mean loss
    whose divisor is 1 / scale; h and w arrive in the matmul dtype, loss and weight gradient fp32+."""
    acc = torch.promote_types(h_nD.dtype, torch.float32)
    logits_nV = (h_nD @ w_VD.t()).to(acc)
    lse_n = torch.logsumexp(logits_nV, dim=-1)
    valid_n = t_n != IGNORE_INDEX
    t_safe_n = torch.where(valid_n, t_n, 0)
    loss = torch.where(valid_n, lse_n - logits_nV.gather(1, t_safe_n[:, None])[:, 0], 0).sum()
    if not (grad_h or grad_w):
        return loss, None, None
    g_nV = torch.exp(logits_nV - lse_n[:, None])  # d loss / d logits = (softmax - one_hot) * scale
    g_nV = g_nV.scatter_add(1, t_safe_n[:, None], torch.full_like(lse_n[:, None], -1.0))
    g_nV = (g_nV * (valid_n[:, None] * scale)).to(h_nD.dtype)
    return loss, g_nV @ w_VD if grad_h else None, _weight_grad(g_nV, h_nD, acc) if grad_w else None


def _chunk_triton(h_nD: torch.Tensor, w_VD: torch.Tensor, t_n: torch.Tensor, scale: torch.Tensor, grad_h: bool,
                  grad_w: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`_chunk` on CUDA: the logits (in the matmul dtype) become their own gradient in place."""
    from hasten.models.ops.triton_cross_entropy import cross_entropy_

    logits_nV = h_nD @ w_VD.t()
    loss = cross_entropy_(logits_nV, t_n, scale, IGNORE_INDEX, write_grad=grad_h or grad_w).sum()
    g_nV = logits_nV  # now (softmax - one_hot) * scale (scale 1 under fp16, see _LinearCrossEntropy)
    acc = torch.promote_types(h_nD.dtype, torch.float32)
    return (loss, g_nV @ w_VD if grad_h else None, _weight_grad(g_nV, h_nD, acc) if grad_w else None)


def _use_triton(h_ND: torch.Tensor, dtype: torch.dtype) -> bool:
    from hasten.models.ops import triton_cross_entropy

    return (_kernel != "torch" and h_ND.is_cuda and dtype in (torch.float32, torch.bfloat16, torch.float16)
            and triton_cross_entropy.available())


@functools.cache
def _compiled_chunk():
    return torch.compile(_chunk, dynamic=False)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor, chunk: int,
                dtype: torch.dtype, step: Callable, grad_h: bool, grad_w: bool) -> torch.Tensor:
        acc = torch.promote_types(dtype, torch.float32)
        w_VD = weight_VD.to(dtype)
        scale = 1.0 / (targets_N != IGNORE_INDEX).sum().clamp(min=1).to(acc)  # a mean over counted tokens
        # The logits' gradient is made before backward brings fp16's loss scale: (softmax - one_hot) / tokens
        # would underflow in fp16 (1e-5 / 32768), so fp16 keeps it unscaled and scales the results instead.
        fp16 = dtype == torch.float16
        kept_scale = torch.ones_like(scale) if fp16 else scale
        loss = torch.zeros((), device=h_ND.device, dtype=acc)
        gh_chunks, gw_VD = [], None
        for start in range(0, h_ND.shape[0], chunk):
            part, gh, gw = step(h_ND[start:start + chunk].to(dtype), w_VD, targets_N[start:start + chunk],
                                kept_scale, grad_h, grad_w)
            loss = loss + part
            if grad_h:
                gh_chunks.append((gh.to(acc) * scale).to(h_ND.dtype) if fp16 else gh.to(h_ND.dtype))
            if grad_w:
                gw_VD = gw if gw_VD is None else gw_VD.add_(gw)
        if fp16 and gw_VD is not None:
            gw_VD = gw_VD.mul_(scale)
        gh_ND = (gh_chunks[0] if len(gh_chunks) == 1 else torch.cat(gh_chunks)) if grad_h else None
        ctx.save_for_backward(gh_ND, gw_VD)
        ctx.weight_dtype = weight_VD.dtype
        return loss * scale

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        return *_kept_gradients(ctx, grad_loss), None, None, None, None, None, None


@torch.compiler.disable  # the chunk loop stays in Python, between the model's compiled graphs
def _linear_cross_entropy(h_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor, chunk: int,
                          dtype: torch.dtype, compiled: bool) -> torch.Tensor:
    # Checked on the device, without waiting for it (the Triton kernel would read out of bounds where
    # F.cross_entropy asserts): on a GPU a bad target stops the run at its next synchronization.
    vocab = weight_VD.shape[0]
    torch._assert_async(((targets_N >= 0) & (targets_N < vocab) | (targets_N == IGNORE_INDEX)).all(),
                        f"a cross-entropy target is outside [0, {vocab}) and not the ignore index {IGNORE_INDEX}: "
                        "the tokenizer's ids must be below model.vocab_size")
    global _last_used, _quack_failed
    if not _quack_failed and _use_quack(h_ND, weight_VD, chunk, dtype):
        try:
            loss = _quack_loss(h_ND, weight_VD, targets_N, chunk)
        except Exception as err:
            if _kernel == "quack":
                raise
            _quack_failed = True  # `auto` goes on without it, in this process; by name it is an error
            warnings.warn(f"QuACK's linear cross-entropy failed ({type(err).__name__}: {str(err)[:300]}); the output "
                          "head and loss run on the Triton kernel from here on", stacklevel=2)
        else:
            _last_used = "quack"
            return loss
    triton = _use_triton(h_ND, dtype)
    _last_used = "triton" if triton else "torch"
    step = _chunk_triton if triton else _compiled_chunk() if compiled else _chunk
    grad = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(h_ND, weight_VD, targets_N, chunk, dtype, step,
                                     grad and h_ND.requires_grad, grad and weight_VD.requires_grad)


def linear_cross_entropy(h_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                         chunk: int = 4096) -> torch.Tensor:
    """Mean cross-entropy of `h_ND @ weight_VD.T` against targets_N (IGNORE_INDEX entries left out),
    in fp32 (or wider), `chunk` tokens at a time. Gradients reach h_ND and weight_VD (each only when
    it requires one and grad mode is on). The matmuls run in autocast's dtype when autocast is on.
    Called while torch.compile traces a model, each chunk's work is compiled (once per chunk size)."""
    if chunk <= 0:
        raise ValueError(f"chunk must be > 0, got {chunk}")
    device = h_ND.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h_ND.dtype
    if dtype == torch.bfloat16:
        # Cast here, in the caller's compiled graph (fused into its last norm), not in the chunk loop's
        # own kernels; the gradient then comes back in bf16 too. fp16 keeps h wide: its gradient,
        # divided by the token count before the loss scale arrives, would underflow.
        h_ND = h_ND.to(dtype)
    return _linear_cross_entropy(h_ND, weight_VD, targets_N, chunk, dtype, torch.compiler.is_compiling())


def linear_cross_entropy_ref(h_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                             chunk: int = 4096) -> torch.Tensor:
    """The same loss the plain way: all logits at once, then F.cross_entropy (chunk is ignored)."""
    logits_NV = torch.nn.functional.linear(h_ND, weight_VD)
    return torch.nn.functional.cross_entropy(logits_NV.to(torch.promote_types(logits_NV.dtype, torch.float32)),
                                             targets_N, ignore_index=IGNORE_INDEX)
