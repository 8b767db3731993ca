"""The chunked head + cross-entropy against the plain head + F.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F

from hasten.config import ModelConfig
from hasten.models import build_model
from hasten.models.ops.cross_entropy import chunk_tokens, linear_cross_entropy, linear_cross_entropy_ref


def _problem(n=300, d=16, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.randn(v, d, generator=g, requires_grad=True)
    y = torch.randint(0, v, (n,), generator=g)
    y[::7] = -100  # ignored positions count neither in the sum nor in the mean
    return h, w, y


def _loss_and_grads(fn, h, w, y, **kw):
    h.grad = w.grad = None
    loss = fn(h, w, y, **kw)
    (3.0 * loss).backward()  # a non-unit incoming gradient
    return loss.detach(), h.grad.clone(), w.grad.clone()


@pytest.mark.parametrize("chunk", [64, 100, 1000])  # several chunks, a ragged last chunk, one chunk
@pytest.mark.parametrize("compiled", [False, True])
def test_matches_the_plain_head_and_cross_entropy(chunk, compiled):
    h, w, y = _problem()
    fn = torch.compile(linear_cross_entropy, fullgraph=True) if compiled else linear_cross_entropy
    got = _loss_and_grads(fn, h, w, y, chunk=chunk)
    want = _loss_and_grads(linear_cross_entropy_ref, h, w, y)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_frozen_head_gets_no_gradient_and_eval_computes_the_loss_only():
    h, w, y = _problem()
    w_frozen = w.detach()
    loss = linear_cross_entropy(h, w_frozen, y, chunk=64)
    loss.backward()
    assert w_frozen.grad is None and h.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, y, chunk=64), linear_cross_entropy_ref(h, w, y))


def test_under_bf16_autocast_it_tracks_the_plain_path():
    h, w, y = _problem()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _loss_and_grads(linear_cross_entropy, h, w, y, chunk=64)
        want = _loss_and_grads(linear_cross_entropy_ref, h, w, y)
    assert got[1].dtype == h.dtype and got[2].dtype == w.dtype
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_chunk_size_is_bounded_by_the_logits_it_holds():
    assert chunk_tokens(32000) == 4096 and chunk_tokens(50304) == 2560 and chunk_tokens(10**9) == 256


def test_decoder_with_targets_returns_the_loss_of_its_logits():
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny"), 300, torch.device("cpu"))
    ids = torch.randint(0, 300, (2, 33))
    x, y = ids[:, :-1], ids[:, 1:].clone()
    y[0, :5] = -100
    want = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    torch.testing.assert_close(model(x, targets_BT=y), want, rtol=1e-5, atol=1e-6)
