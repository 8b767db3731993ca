"""Chunked output head + cross-entropy (hasten.models.ops.cross_entropy) against the plain loss."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.saved import kept_for_backward, nbytes

from hasten.config import ModelConfig
from hasten.models import build_model
from hasten.models.ops import cross_entropy
from hasten.models.ops.cross_entropy import IGNORE_INDEX, linear_cross_entropy, linear_cross_entropy_ref


def _inputs(dtype=torch.float64, n=37, d=16, v=50):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, dtype=dtype, generator=g, requires_grad=True)
    w = torch.randn(v, d, dtype=dtype, generator=g, requires_grad=True)
    t = torch.randint(0, v, (n,), generator=g)
    t[::5] = IGNORE_INDEX
    return h, w, t


@pytest.mark.parametrize("chunk", [1, 8, 37, 100])
def test_matches_plain_cross_entropy_and_its_gradients(chunk):
    """Loss and both gradients equal the plain loss's to fp64 rounding, with ignored targets and a
    chunk that does not divide the tokens; a loss scaled after the call scales the gradients."""
    h, w, t = _inputs()
    got, want = linear_cross_entropy(h, w, t, chunk), linear_cross_entropy_ref(h, w, t)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(3 * got, (h, w)), torch.autograd.grad(3 * want, (h, w))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_frozen_weight_gets_no_gradient_and_eval_makes_none():
    h, w, t = _inputs()
    w.requires_grad_(False)
    (gh,) = torch.autograd.grad(linear_cross_entropy(h, w, t, 8), (h,))
    torch.testing.assert_close(gh, torch.autograd.grad(linear_cross_entropy_ref(h, w, t), (h,))[0])
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, t, 8)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, linear_cross_entropy_ref(h, w, t).detach())


def test_all_targets_ignored_gives_zero_loss_and_gradient():
    h, w, t = _inputs()
    loss = linear_cross_entropy(h, w, torch.full_like(t, IGNORE_INDEX), 8)
    loss.backward()
    assert loss.item() == 0 and h.grad.abs().max() == 0 and w.grad.abs().max() == 0


@pytest.mark.parametrize("bad", [50, -1])
def test_a_target_outside_the_vocabulary_is_refused_with_a_sentence(bad):
    """Every path checks the targets (the CUDA Triton kernel would otherwise read out of bounds):
    on the CPU the check raises at once, on a GPU at the next synchronization."""
    h, w, t = _inputs()  # v = 50 rows
    t[3] = bad
    with pytest.raises(RuntimeError, match=r"outside \[0, 50\) and not the ignore index -100"):
        linear_cross_entropy(h, w, t, 8)


def test_bf16_autocast_runs_matmuls_in_bf16_and_loss_in_fp32():
    h, w, t = _inputs(torch.float32, n=64, d=32, v=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(h, w, t, 16)
        want = linear_cross_entropy_ref(h, w, t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
    got.backward()
    assert w.grad.dtype == torch.float32 and h.grad.dtype == torch.float32


def _decoder(vocab=512, n_layers=2):
    torch.manual_seed(0)
    return build_model(ModelConfig(dim=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64), vocab)


def test_decoder_loss_from_targets_equals_loss_of_its_logits():
    """model(idx, targets_BT=...) is the cross-entropy of model(idx), gradients included, eager and
    under torch.compile (where the chunk loop runs between the model's graphs, each chunk compiled)."""
    idx = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(1))
    targets = idx[:, 1:].clone()
    targets[0, :5] = IGNORE_INDEX
    model = _decoder(n_layers=1)  # the head and loss are under test; one block compiles in half the time
    want = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    want.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for compiled in (False, True):
        model.zero_grad()
        fn = torch.compile(model) if compiled else model
        loss = fn(idx[:, :-1], targets_BT=targets, loss_chunk=24)
        loss.backward()
        torch.testing.assert_close(loss, want)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=f"{n} (compiled={compiled})")


def test_compiled_lora_decoder_keeps_no_logits_for_backward():
    """A compiled bf16 LoRA decoder keeps tokens x vocab values for backward with the plain loss
    (the logits, or the compiler's share of them); with the chunked loss it keeps the hidden
    states' gradient instead. Same loss."""
    pytest.importorskip("peft")
    from hasten.config import PeftConfig
    from hasten.methods import peft

    def kept(chunk: int) -> tuple[int, torch.Tensor]:
        model = peft.apply(_decoder(vocab=2048, n_layers=1), PeftConfig(method="lora", rank=8, alpha=16))
        peft.cast_frozen(model, torch.bfloat16)

        def loss_fn(idx):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                if chunk:
                    return model(idx[:, :-1], targets_BT=idx[:, 1:], loss_chunk=chunk)
                return F.cross_entropy(model(idx[:, :-1]).float().flatten(0, 1), idx[:, 1:].flatten())

        acts, loss = kept_for_backward(loss_fn, model.parameters(),
                                       torch.randint(0, 2048, (2, 65), generator=torch.Generator().manual_seed(1)))
        return nbytes(acts), loss

    plain, loss_plain = kept(0)
    chunked, loss_chunked = kept(32)
    logits_bytes = 2 * 64 * 2048 * 2  # one bf16 copy of the logits; the chunked loss keeps 2 x 64 x 32 instead
    assert plain - chunked >= 0.9 * logits_bytes, (plain, chunked)
    torch.testing.assert_close(loss_chunked.detach(), loss_plain.detach(), rtol=1e-2, atol=1e-2)


def test_training_with_loss_chunk_follows_the_plain_loss(tiny_config):
    """train.loss_chunk: the same run, step for step, as the plain loss (fp32; on a GPU the chunk's
    Triton kernel, on the CPU the plain operations)."""
    import hasten
    from hasten.models.ops import triton_cross_entropy
    from hasten.train.log import read_log

    def losses(*overrides, out):
        hasten.train(tiny_config("train.steps=4", "log.every=1", "train.eval_every=0", "checkpoint.every=0",
                                 "precision.dtype=fp32", *overrides, out=out))
        return [r["loss"] for r in read_log(tiny_config(out=out).train.out_dir + "/metrics.jsonl")
                if r["event"] == "train"]

    plain, chunked = losses(out="plain"), losses("train.loss_chunk=48", out="chunked")
    assert len(plain) == 4
    summaries = [json.loads((Path(tiny_config(out=out).train.out_dir) / "summary.json").read_text())
                 for out in ("plain", "chunked")]
    chunk_kernel = "triton" if triton_cross_entropy.available() else "torch"
    assert [s["loss_kernel"] for s in summaries] == [None, chunk_kernel]  # what ran the head and loss, if the chunk did
    torch.testing.assert_close(torch.tensor(chunked), torch.tensor(plain), rtol=1e-4, atol=1e-4)


def test_fp16_gradients_neither_underflow_nor_overflow():
    """Under fp16 autocast the chunked loss's gradients are as close to float64 as the plain loss's
    (scaled by 1/tokens before backward's loss scale, most of the softmax would underflow: 20x the
    error); and a weight gradient summed over many tokens stays finite (one target everywhere, |h| 8:
    16384 x 8 x 15/16 passes fp16's 65504 in a single matmul)."""
    g = torch.Generator().manual_seed(0)
    n, d, v = 4096, 64, 5000
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = (torch.randn(v, d, generator=g) * 0.05).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = torch.autograd.grad(linear_cross_entropy_ref(h64, w64, t), (h64, w64))

    def rel_errors(fn):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = fn(h, w, t)
        got = torch.autograd.grad(loss * 1024, (h, w))  # a loss scale, as fp16 training uses
        return [((a.double() / 1024 - b).norm() / b.norm()).item() for a, b in zip(got, want)]

    chunked = rel_errors(lambda h, w, t: linear_cross_entropy(h, w, t, 1024))
    plain = rel_errors(linear_cross_entropy_ref)
    assert all(c < 1.5 * p for c, p in zip(chunked, plain)), (chunked, plain)

    h = torch.full((16384, 8), 8.0, requires_grad=True)
    w = torch.zeros(16, 8, requires_grad=True)
    t = torch.zeros(16384, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.float16):
        (gw,) = torch.autograd.grad(linear_cross_entropy(h, w, t, 16384), (w,))
    torch.testing.assert_close(gw[0], torch.full((8,), -8.0 * 15 / 16))
    torch.testing.assert_close(gw[1:], torch.full((15, 8), 8.0 / 16))


@pytest.fixture
def loss_kernel():
    """Sets the process-wide loss kernel for one test and puts `auto` back after it."""
    yield cross_entropy.set_kernel
    cross_entropy.set_kernel("auto")
    cross_entropy._quack_failed = False


def test_auto_goes_on_without_quack_when_it_fails_and_by_name_it_raises(loss_kernel, monkeypatch):
    """A QuACK call that raises (a kernel that does not build on this machine, say) leaves `auto` on
    the other kernels with a warning, for this call and the next, which does not try it again; asked
    for by name, the error is the caller's."""
    calls = []

    def failing(*args):
        calls.append(1)
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(cross_entropy, "_use_quack", lambda *args: True)
    monkeypatch.setattr(cross_entropy, "_quack_loss", failing)
    h, w, t = _inputs()
    loss_kernel("quack")
    with pytest.raises(RuntimeError, match="no kernel for this GPU"):
        linear_cross_entropy(h, w, t, 8)
    loss_kernel("auto")
    with pytest.warns(UserWarning, match="QuACK's linear cross-entropy failed .*no kernel for this GPU"):
        got = linear_cross_entropy(h, w, t, 8)
    torch.testing.assert_close(got, linear_cross_entropy_ref(h, w, t), rtol=1e-12, atol=1e-12)
    assert cross_entropy.last_kernel() == "torch"
    linear_cross_entropy(h, w, t, 8)
    assert len(calls) == 2  # the failed `auto` call was the last attempt


def test_a_broken_quack_install_is_reported_not_raised(tmp_path, monkeypatch):
    """Installed but failing at import (as quack-kernels does against a cutlass-dsl it does not
    match): the reason comes back as text, for `auto` to pass over and `quack` to name."""
    package = tmp_path / "quack"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "linear_cross_entropy.py").write_text("raise TypeError('epilogue fn depends on a ContextVar')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "quack" or m.startswith("quack.")]:
        monkeypatch.delitem(sys.modules, name)
    cross_entropy.quack_import_error.cache_clear()
    try:
        assert cross_entropy.quack_import_error() == "TypeError: epilogue fn depends on a ContextVar"
    finally:
        cross_entropy.quack_import_error.cache_clear()
        for name in [m for m in sys.modules if m == "quack" or m.startswith("quack.")]:
            del sys.modules[name]


def test_torch_kernel_matches_the_plain_loss_and_bad_names_fail(loss_kernel):
    loss_kernel("torch")
    h, w, t = _inputs()
    got, want = linear_cross_entropy(h, w, t, 8), linear_cross_entropy_ref(h, w, t)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, (h, w)), torch.autograd.grad(want, (h, w))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="loss kernel must be one of"):
        loss_kernel("cutlass")


def _quack_ready() -> bool:
    return torch.cuda.is_available() and cross_entropy.quack_available(torch.cuda.current_device())


@pytest.mark.skipif(not _quack_ready(), reason="QuACK's linear cross-entropy runs on a Hopper GPU with quack-kernels")
@pytest.mark.parametrize("kernel", ["auto", "quack"])
def test_quack_path_matches_the_plain_loss_on_hopper(loss_kernel, kernel):
    """bf16 under autocast with fp32 weights, as training runs it: QuACK's loss and gradients match
    the plain loss in float64 from the same rounded inputs, with ignored targets and a last chunk
    shorter than the others; a batch with every target ignored gives 0, not 0 / 0."""
    loss_kernel(kernel)
    g = torch.Generator().manual_seed(0)
    n, d, v = 3000, 256, 50304
    h = torch.randn(n, d, generator=g).bfloat16().cuda().requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.05).cuda().requires_grad_()
    t = torch.randint(0, v, (n,), generator=g).cuda()
    t[::4] = IGNORE_INDEX
    with torch.autocast("cuda", torch.bfloat16):
        got = linear_cross_entropy(h, w, t, 1024)
    gh, gw = torch.autograd.grad(2 * got, (h, w))
    assert gw.dtype == torch.float32
    h64, w64 = h.detach().double().requires_grad_(), w.detach().bfloat16().double().requires_grad_()
    want = linear_cross_entropy_ref(h64, w64, t)
    wh, ww = torch.autograd.grad(2 * want, (h64, w64))
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(gh.double(), wh, rtol=2e-2, atol=2e-5)
    torch.testing.assert_close(gw.double(), ww, rtol=2e-2, atol=2e-5)
    t[:] = IGNORE_INDEX
    with torch.autocast("cuda", torch.bfloat16):
        none = linear_cross_entropy(h, w, t, 1024)
    assert none.item() == 0.0 and not torch.autograd.grad(none, (h,))[0].any()


def _triton_ready() -> bool:
    from hasten.models.ops.triton_cross_entropy import available

    return available()


@pytest.mark.skipif(not _triton_ready(), reason="the Triton cross-entropy runs on CUDA with Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_path_matches_the_plain_loss_on_cuda(loss_kernel, dtype):
    """On CUDA the chunks take the in-place Triton kernel: loss and gradients match the plain loss
    computed from the same (rounded) inputs in float64, with ignored targets, a vocabulary no power
    of two and chunks that do not divide the tokens; eval (no grad) gives the same loss."""
    loss_kernel("triton")
    g = torch.Generator().manual_seed(0)
    n, d, v = 301, 64, 5003
    h = torch.randn(n, d, generator=g).to(dtype).cuda().requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.3).to(dtype).cuda().requires_grad_()
    t = torch.randint(0, v, (n,), generator=g).cuda()
    t[::4] = IGNORE_INDEX
    got = linear_cross_entropy(h, w, t, 128)
    gh, gw = torch.autograd.grad(2 * got, (h, w))
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = linear_cross_entropy_ref(h64, w64, t)
    wh, ww = torch.autograd.grad(2 * want, (h64, w64))
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(got.double(), want, **tol)
    torch.testing.assert_close(gh.double(), wh, **tol)
    torch.testing.assert_close(gw.double(), ww, **tol)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t, 128), got.detach())
    again = linear_cross_entropy(h, w, t, 128)  # backward scales the kept gradients in place: once only
    torch.autograd.grad(again, (h, w), retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        torch.autograd.grad(again, (h, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_rows_match_cross_entropy_and_its_gradient(dtype, triton_device):
    """The kernel itself, on a GPU or under Triton's interpreter on the CPU: per-row losses (0 on
    ignored rows) and, written over the logits, the gradient of scale * sum(loss), against float64;
    a vocabulary no multiple of the block; without write_grad the logits stay as they were."""
    from hasten.models.ops.triton_cross_entropy import cross_entropy_

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(9, 1000, generator=g) * 3).to(dtype).to(triton_device)
    t = torch.randint(0, 1000, (9,), generator=g).to(triton_device)
    t[::4] = IGNORE_INDEX
    x64 = logits.double().requires_grad_()
    want = F.cross_entropy(x64, t, ignore_index=IGNORE_INDEX, reduction="none")
    (grad_want,) = torch.autograd.grad(0.5 * want.sum(), x64)
    kept = logits.clone()
    loss = cross_entropy_(kept, t, torch.tensor(0.5, device=triton_device), IGNORE_INDEX, write_grad=False, block=256)
    assert torch.equal(kept, logits)
    loss_g = cross_entropy_(logits, t, torch.tensor(0.5, device=triton_device), IGNORE_INDEX, block=256)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=4e-3)
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_g, loss)
    torch.testing.assert_close(logits.double(), grad_want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_multiplies_in_place_by_a_device_scalar(dtype, triton_device):
    """The in-place scale of the kept gradients (QuACK's path): x * s in fp32, rounded once (as PyTorch
    rounds, on a GPU), over a length no multiple of the block; a view of a larger tensor's leading rows
    leaves the rest as it was."""
    from hasten.models.ops.triton_cross_entropy import scale_

    g = torch.Generator().manual_seed(0)
    base = torch.randn(7, 333, generator=g).to(dtype).to(triton_device)
    x = base[:5]
    before = base.clone()
    s = torch.tensor(0.37, device=triton_device)
    assert scale_(x, s, block=256) is x
    want = before[:5].float() * s
    if triton_device == "cpu" and dtype == torch.bfloat16:  # the interpreter rounds to bf16 toward zero
        assert ((x.float() - want).abs() <= want.abs() * 2.0**-7).all()
    else:
        assert torch.equal(x, want.to(dtype))
    assert torch.equal(base[5:], before[5:])
    with pytest.raises(ValueError, match="contiguous"):
        scale_(base.t(), s)
