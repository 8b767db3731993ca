"""model.fuse_projections: q/k/v and gate/up as one matmul each, with the Triton kernels of
hasten.models.ops.projections around them. The reference is the unfused PyTorch of
hasten.models.layers. The kernels are checked on a GPU, or on the CPU under Triton's interpreter
(`triton_device`); the fused model itself runs them on CUDA only."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hasten.config import ConfigError, load_config
from hasten.models import build_model
from hasten.models.layers import apply_rope, fusable, rope_tables
from hasten.models.ops import projections
from tests.fused import fused_against_plain, kernels_run

cuda = pytest.mark.skipif(not projections.available(), reason="the fused projections' kernels run on CUDA with Triton")


def test_fusable_takes_plain_linears_only():
    class Wrapped(nn.Linear):  # as fake-quantized and fp8 linears are: subclasses with their own forward
        pass

    assert fusable(nn.Linear(4, 4), nn.Linear(4, 8))
    assert not fusable(nn.Linear(4, 4), Wrapped(4, 4))


def test_fuse_projections_is_refused_with_zero3():
    load_config("default", ["model.fuse_projections=true", "parallel.strategy=zero2"])
    with pytest.raises(ConfigError, match="model.fuse_projections.*zero3"):
        load_config("default", ["model.fuse_projections=true", "parallel.strategy=zero3"])


def test_on_the_cpu_the_fused_model_is_the_unfused_one():
    """Without the kernels the key changes nothing: same parameters, same outputs, bit for bit."""
    plain, fused = (load_config("default", ["model.preset=tiny", f"model.fuse_projections={f}"]).model
                    for f in ("false", "true"))
    torch.manual_seed(0)
    a = build_model(plain, 256, torch.device("cpu"))
    b = build_model(fused, 256, torch.device("cpu"))
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 256, (2, 16))
    assert torch.equal(a(x), b(x))


def _qkv_reference(qkv, cos, sin, H, K, d):
    B, T, _ = qkv.shape
    q, k, v = qkv.split([H * d, K * d, K * d], dim=-1)
    q = apply_rope(q.view(B, T, H, d).transpose(1, 2), cos, sin).transpose(1, 2)
    k = apply_rope(k.view(B, T, K, d).transpose(1, 2), cos, sin).transpose(1, 2)
    return q, k, v.reshape(B, T, K, d)


@pytest.mark.parametrize("H,K,d", [(12, 12, 64), (8, 2, 64), (6, 3, 32), (4, 2, 40)])  # 40: a padded half
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_qkv_rope_matches_the_unfused_rope_and_its_gradient(H, K, d, dtype, triton_device):
    torch.manual_seed(0)
    B, T = 3, 40
    cos, sin = rope_tables(d, T, device=triton_device)
    qkv = torch.randn(B, T, (H + 2 * K) * d, device=triton_device, dtype=dtype, requires_grad=True)
    outs = projections.qkv_rope(qkv, cos, sin, H, K)
    refs = _qkv_reference(qkv, cos, sin, H, K, d)
    tol = dict(atol=1e-2, rtol=1e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    grads = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(sum((o * g).sum() for o, g in zip(outs, grads)), qkv)[0]
    want = torch.autograd.grad(sum((r * g).sum() for r, g in zip(refs, grads)), qkv)[0]
    for o, r in zip(outs, refs):
        assert o.is_contiguous() and o.shape == r.shape
        torch.testing.assert_close(o, r, **tol)
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_swiglu_matches_silu_gate_times_up_and_its_gradient(dtype, triton_device):
    torch.manual_seed(0)
    h = torch.randn(5, 7, 2 * 1500, device=triton_device, dtype=dtype, requires_grad=True)  # 1500: a partial block
    y = projections.swiglu(h)
    gate, up = h.chunk(2, dim=-1)
    ref = F.silu(gate.float()) * up.float()
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y.float(), ref, **tol)
    dy = torch.randn_like(y)
    got = torch.autograd.grad((y * dy).sum(), h)[0]
    want = torch.autograd.grad((ref * dy.float()).sum(), h)[0]
    torch.testing.assert_close(got.float(), want.float(), **tol)


@cuda
@pytest.mark.parametrize("compile", [False, True])
def test_fused_model_matches_the_unfused_model_in_loss_and_gradients(compile):
    """A GQA model (tiny preset: 4 heads, 2 kv heads) with and without fuse_projections, same weights,
    bf16 autocast: close losses and gradients, and the fused one really ran the kernels."""
    def loss_fn(run, x):
        return F.cross_entropy(run(x[:, :-1]).float().flatten(0, 1), x[:, 1:].flatten())

    model, x = fused_against_plain(["model.preset=tiny"], ["model.preset=tiny", "model.fuse_projections=true"],
                                   loss_fn, compile, loss_atol=2e-2)
    names = kernels_run(model, x)
    assert "qkv_rope_fwd" in names and "swiglu_fwd" in names


@cuda
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_makes_the_fp32_weight_gradient_in_its_gemm(compile, bias):
    """Under bf16 autocast with fp32 weights: the same output and input gradient as F.linear, and the
    weight's (and bias's) gradient in fp32, closer to the float64 one than autocast's bf16-rounded one."""
    torch.manual_seed(0)
    x = torch.randn(4, 256, 192, device="cuda").bfloat16().requires_grad_()
    w = (torch.randn(320, 192, device="cuda") * 0.05).requires_grad_()
    b = torch.randn(320, device="cuda").requires_grad_() if bias else None
    dy = torch.randn(4, 256, 320, device="cuda").bfloat16()
    leaves = [t for t in (x, w, b) if t is not None]

    def run(fn):
        with torch.autocast("cuda", torch.bfloat16):
            y = fn(x, w, b)
        return y, torch.autograd.grad(y, leaves, dy)

    fn = torch.compile(projections.linear, fullgraph=True) if compile else projections.linear
    y, grads = run(fn)
    y_ref, grads_ref = run(F.linear)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    torch.testing.assert_close(grads[0], grads_ref[0])
    assert all(g.dtype == torch.float32 for g in grads[1:])
    exact = dy.double().flatten(0, 1).t() @ x.double().flatten(0, 1)
    err, err_ref = (grads[1].double() - exact).abs().max(), (grads_ref[1].double() - exact).abs().max()
    assert err < err_ref / 4, (err, err_ref)
    if bias:
        torch.testing.assert_close(grads[2], dy.float().sum((0, 1)), rtol=1e-4, atol=1e-3)


def test_gemm_kernel_names_its_layers_and_quack_needs_a_hopper_gpu():
    """train.gemm_kernel=quack without the fused layers fails at load; by name on the CPU it fails with
    what is missing, and auto resolves to cuBLAS there (the process-wide choice set each run)."""
    from hasten.methods.precision import resolve_precision
    from hasten.train.build import select_gemm_kernel

    with pytest.raises(ConfigError, match="train.gemm_kernel.*model.fuse_projections=true"):
        load_config("default", ["train.gemm_kernel=quack"])
    with pytest.raises(ConfigError, match="train.gemm_kernel.*'cutlass'.*auto, quack, cublas"):
        load_config("default", ["train.gemm_kernel=cutlass"])
    config = load_config("default", ["model.fuse_projections=true", "train.gemm_kernel=quack"])
    precision = resolve_precision(config.precision, torch.device("cpu"))
    with pytest.raises(ConfigError, match="train.gemm_kernel=quack runs on a Hopper GPU.*on cpu"):
        select_gemm_kernel(config.train, True, torch.device("cpu"), precision)
    config.train.gemm_kernel = "auto"
    assert select_gemm_kernel(config.train, True, torch.device("cpu"), precision) == "cublas"
    assert projections.gemm_kernel() == "cublas"
    with pytest.raises(ValueError, match="quack or cublas"):
        projections.set_gemm_kernel("auto")


def _quack_gemm_ready() -> bool:
    return (projections.available() and torch.cuda.get_device_capability() == (9, 0)
            and projections.quack_gemm_error() is None)


def _on_quack_then_cublas(run):
    """run() with train.gemm_kernel=quack (untuned), then with cublas, compiled graphs dropped between."""
    try:
        projections.set_gemm_kernel("quack", tuned=False)
        torch._dynamo.reset()
        on_quack = run()
    finally:
        projections.set_gemm_kernel("cublas")
        torch._dynamo.reset()
    return on_quack, run()


@pytest.mark.skipif(not _quack_gemm_ready(), reason="QuACK's GEMM runs on a Hopper GPU with quack-kernels")
@pytest.mark.parametrize("compile", [False, True])
def test_quack_gemm_matches_cublas_in_the_fused_linear(compile):
    """With train.gemm_kernel=quack the fused layers' forward and input-gradient GEMMs run on QuACK's
    kernel: the same results as cuBLAS's to bf16 rounding, the fp32 weight gradient unchanged."""
    torch.manual_seed(0)
    x = torch.randn(4, 256, 192, device="cuda").bfloat16().requires_grad_()
    w = (torch.randn(320, 192, device="cuda") * 0.05).requires_grad_()
    dy = torch.randn(4, 256, 320, device="cuda").bfloat16()

    def run():
        fn = torch.compile(projections.linear, fullgraph=True) if compile else projections.linear
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            with torch.autocast("cuda", torch.bfloat16):
                y = fn(x, w)
            grads = torch.autograd.grad(y, (x, w), dy)
        return y, grads, " ".join(e.key for e in prof.key_averages())

    (y, grads, names), (y_ref, grads_ref, names_ref) = _on_quack_then_cublas(run)
    assert "quack" in names.lower() and "quack" not in names_ref.lower()
    exact = x.double() @ w.detach().double().t()
    for out, ref, full in ((y, y_ref, exact), (grads[0], grads_ref[0], dy.double() @ w.detach().double())):
        assert out.dtype == torch.bfloat16
        err, err_ref = ((o.double() - full).norm() / full.norm() for o in (out, ref))
        assert err < 4e-3 and err < 2 * err_ref, (err, err_ref)
    torch.testing.assert_close(grads[1], grads_ref[1])


@pytest.mark.skipif(not _quack_gemm_ready(), reason="QuACK's GEMM runs on a Hopper GPU with quack-kernels")
@pytest.mark.parametrize("compile", [False, True])
def test_quack_swiglu_mlp_matches_the_kernel_path(compile):
    """With train.gemm_kernel=quack the fused feed-forward computes the SwiGLU in QuACK's GEMM
    epilogues (its pre-activation interleaved): the output and all three gradients as the cuBLAS +
    Triton path gives them, to bf16 rounding, W13's gradient back in [W1; W3] order and fp32."""
    torch.manual_seed(0)
    D, F_ = 192, 256
    x = torch.randn(4, 256, D, device="cuda").bfloat16().requires_grad_()
    w13 = (torch.randn(2 * F_, D, device="cuda") * 0.08).requires_grad_()
    w2 = (torch.randn(D, F_, device="cuda") * 0.08).requires_grad_()
    dy = torch.randn(4, 256, D, device="cuda").bfloat16()

    def run():
        fn = torch.compile(projections.swiglu_mlp, fullgraph=True) if compile else projections.swiglu_mlp
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            with torch.autocast("cuda", torch.bfloat16):
                y = fn(x, w13, w2)
            grads = torch.autograd.grad(y, (x, w13, w2), dy)
        return y, grads, " ".join(e.key for e in prof.key_averages())

    (y, grads, names), (y_ref, grads_ref, names_ref) = _on_quack_then_cublas(run)
    assert "swiglu" in names_ref and "swiglu_fwd" not in names and "quack" in names.lower()
    assert y.dtype == torch.bfloat16 and [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]
    for out, ref in ((y, y_ref), *zip(grads, grads_ref)):
        err = (out.double() - ref.double()).norm() / ref.double().norm()
        assert err < 1e-2, err


@pytest.mark.skipif(not _quack_gemm_ready(), reason="QuACK's GEMM runs on a Hopper GPU with quack-kernels")
def test_auto_probes_quack_gated_gemms_and_falls_back_to_cublas(monkeypatch):
    """train.gemm_kernel=auto takes QuACK where its GEMM and its gated GEMMs (the SwiGLU feed-forward) agree
    with fp32 products; a gated GEMM that disagrees (as from another QuACK version) leaves the run on cuBLAS
    with a warning that names it."""
    import quack.gemm_interface

    from hasten.methods.precision import resolve_precision
    from hasten.train.build import _quack_gemm_probe, select_gemm_kernel

    device = torch.device("cuda")
    assert _quack_gemm_probe(device) is None
    config = load_config("gpt2-124m", ["train.gemm_kernel=auto", "train.gemm_tune=false"])
    precision = resolve_precision(config.precision, device)
    try:
        assert select_gemm_kernel(config.train, True, device, precision) == "quack"
        real = quack.gemm_interface.gemm_gated

        def off_by_a_tenth(*args, **kwargs):
            h, y = real(*args, **kwargs)
            return h, y * 1.1

        monkeypatch.setattr(quack.gemm_interface, "gemm_gated", off_by_a_tenth)
        with pytest.warns(UserWarning, match="its GEMMs failed.*gated forward: relative error"):
            assert select_gemm_kernel(config.train, True, device, precision) == "cublas"
        assert projections.gemm_kernel() == "cublas"
    finally:
        projections.set_gemm_kernel("cublas")


def _decoded_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The logits of one token decoded from the KV cache after an 8-token prompt: GEMMs of one row."""
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        cache = model.new_cache()
        model(x[:1, :8], cache=cache)
        return model(x[:1, 8:9], cache=cache).float()


@pytest.mark.skipif(not _quack_gemm_ready(), reason="QuACK's GEMM runs on a Hopper GPU with quack-kernels")
@pytest.mark.parametrize("compile", [False, True])
def test_fused_model_on_quack_gemms_trains_and_decodes(compile):
    """The whole fused model with train.gemm_kernel=quack: loss and every gradient as the unfused model's,
    QuACK's kernels (the SwiGLU in its epilogues) in the forward, and a token decoded from the cache (as
    the sample after training is) with the logits of the cuBLAS path."""
    def loss_fn(run, x):
        return F.cross_entropy(run(x[:, :-1]).float().flatten(0, 1), x[:, 1:].flatten())

    def run():
        model, x = fused_against_plain(["model.preset=tiny"], ["model.preset=tiny", "model.fuse_projections=true"],
                                       loss_fn, compile, loss_atol=2e-2)
        return model, x, kernels_run(model, x), _decoded_logits(model, x)

    (model, x, names, decoded), _ = _on_quack_then_cublas(run)
    assert "quack" in names.lower() and "swiglu_fwd" not in names and "qkv_rope_fwd" in names
    torch.testing.assert_close(decoded, _decoded_logits(model, x), atol=2e-2, rtol=2e-2)
