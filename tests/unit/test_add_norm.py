"""model.fuse_norms: the split stream's sum, split and RMSNorm as one Triton kernel each way
(hasten.models.ops.add_norm). The reference is the unfused PyTorch of the decoder's split blocks.
The kernels are checked on a GPU, or on the CPU under Triton's interpreter (`triton_device`); the
fused model itself runs them on CUDA only."""

import pytest
import torch
import torch.nn.functional as F

from hasten.config import load_config
from hasten.models import build_model
from hasten.models.gpt import join_stream, split_stream
from hasten.models.ops import add_norm
from tests.fused import fused_against_plain, kernels_run

cuda = pytest.mark.skipif(not add_norm.available(), reason="the fused norms' kernels run on CUDA with Triton")


def _reference(hi, lo, branch, weight, eps):
    """The unfused split block's residual point: sum, split, the next norm of the pair."""
    new_hi, new_lo = split_stream(join_stream(hi, lo) + branch.float())
    y = F.rms_norm(join_stream(new_hi, new_lo), (hi.shape[-1],), weight, eps)
    return new_hi, new_lo, y


@pytest.mark.parametrize("shape", [(3, 37, 96), (2, 5, 200), (64, 768)])  # rows off the tile, widths no power of two
@pytest.mark.parametrize("hi_used", [True, False])  # False: the last point, where only the norm's output is used
def test_add_rms_norm_matches_the_split_block_and_its_gradients(shape, hi_used, triton_device):
    torch.manual_seed(0)
    D = shape[-1]
    s = torch.randn(shape, device=triton_device) * 3
    hi0, lo0 = split_stream(s)
    branch = torch.randn(shape, device=triton_device).bfloat16()
    weight = (1 + 0.1 * torch.randn(D, device=triton_device))
    leaves = [t.clone().requires_grad_() for t in (hi0, branch, weight)]
    refs = [t.clone().requires_grad_() for t in (hi0, branch, weight)]
    hi, lo, y, rstd = add_norm.add_rms_norm(leaves[0], lo0, leaves[1], leaves[2], 1e-5)
    r_hi, r_lo, r_y = _reference(refs[0], lo0, refs[1], refs[2], 1e-5)
    # The pair holds the fp32 sum to 16 bits; on a GPU it is the reference's bit for bit (Triton's
    # interpreter rounds fp32 to bf16 toward zero, the GPU to nearest as PyTorch does).
    total = join_stream(hi0, lo0) + branch.float()
    assert ((join_stream(hi, lo) - total).abs() <= total.abs() * 2.0**-15).all()
    assert triton_device == "cpu" or (torch.equal(hi, r_hi) and torch.equal(lo, r_lo))
    assert y.dtype == torch.bfloat16 and rstd.shape == (s.numel() // D,)
    torch.testing.assert_close(y.float(), r_y, atol=2e-2, rtol=1e-2)
    dy = torch.randn(shape, device=triton_device).bfloat16()
    d_hi = torch.randn(shape, device=triton_device).bfloat16()
    got = torch.autograd.grad((y.float() * dy.float()).sum() + ((hi.float() * d_hi.float()).sum() if hi_used else 0),
                              leaves)
    want = torch.autograd.grad((r_y * dy.float()).sum() + ((r_hi.float() * d_hi.float()).sum() if hi_used else 0),
                               refs)
    assert got[0].dtype == got[1].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    assert torch.equal(got[0], got[1])  # the gradient of hi and of the branch: the sum's, once
    torch.testing.assert_close(got[0].float(), want[0].float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got[1].float(), want[1].float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got[2], want[2], atol=1e-3 * want[2].abs().max().item(), rtol=1e-3)


@pytest.mark.parametrize("deterministic", [False, True])  # the weight's gradient added atomically, or summed after
def test_add_rms_norm_backward_weight_gradient_both_ways(deterministic, triton_device):
    torch.manual_seed(0)
    N, D = 300, 96  # more row blocks than the interpreter's programs: each program adds several
    hi, lo = split_stream(torch.randn(N, D, device=triton_device) * 3)
    weight = 1 + 0.1 * torch.randn(D, device=triton_device)
    rstd = torch.rsqrt(join_stream(hi, lo).pow(2).mean(-1) + 1e-5)
    dy = torch.randn(N, D, device=triton_device).bfloat16()
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        ds, dw = add_norm.add_rms_norm_backward(None, dy, hi, lo, rstd, weight)
        again = add_norm.add_rms_norm_backward(None, dy, hi, lo, rstd, weight)[1]
    finally:
        torch.use_deterministic_algorithms(was)
    want = (dy.float() * join_stream(hi, lo) * rstd[:, None]).sum(0)
    assert dw.shape == (D,) and dw.dtype == torch.float32
    torch.testing.assert_close(dw, want, atol=1e-4 * want.abs().max().item(), rtol=1e-4)
    if deterministic:
        assert torch.equal(dw, again)


@pytest.mark.parametrize("split", ["true", "false"])
def test_on_the_cpu_or_without_the_split_stream_the_fused_norms_change_nothing(split):
    """Without the kernels, or without the split stream they fuse, the key changes nothing: same
    outputs, bit for bit."""
    plain, fused = (load_config("default", ["model.preset=tiny", f"model.split_residual={split}",
                                            f"model.fuse_norms={f}"]).model for f in ("false", "true"))
    torch.manual_seed(0)
    a = build_model(plain, 256, torch.device("cpu"))
    b = build_model(fused, 256, torch.device("cpu"))
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 256, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(a(x), b(x))


@cuda
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("fuse_projections", [False, True])
def test_fused_norms_model_matches_the_split_model_in_loss_and_gradients(compile, fuse_projections):
    """The split-stream model with and without fuse_norms, same weights, bf16 autocast: close losses
    and gradients, and the fused one really ran the kernels."""
    common = ["model.preset=tiny", "model.split_residual=true", f"model.fuse_projections={fuse_projections}"]
    model, x = fused_against_plain(common, [*common, "model.fuse_norms=true"],
                                   lambda run, x: run(x[:, :-1], targets_BT=x[:, 1:]), compile, loss_atol=1e-2)
    assert "add_norm_fwd" in kernels_run(model, x)
