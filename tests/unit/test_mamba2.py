"""Mamba-2: the chunked SSD scan against the step-by-step reference (values, gradients, final
state), the recurrent step against the parallel forward, and the mixer inside the decoder."""

from __future__ import annotations

import pytest
import torch
from tests.saved import compiled_for_saved, kept_storage_bytes, saved_by_forward

from hasten.config import ModelConfig
from hasten.models import Mamba2, build_model, generate, ssd_scan, ssd_scan_ref
from hasten.models.mamba2 import causal_conv, gated_rms_norm


def _inputs(T: int, seed: int = 0, H: int = 4, P: int = 8, G: int = 2, N: int = 16, Bsz: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(Bsz, T, H, P, generator=g)
    dt = torch.rand(Bsz, T, H, generator=g) * 0.5 + 0.01
    A = -(torch.rand(H, generator=g) * 2 + 0.5)
    B, C = torch.randn(Bsz, T, G, N, generator=g), torch.randn(Bsz, T, G, N, generator=g)
    h0 = torch.randn(Bsz, H, P, N, generator=g)
    return x, dt, A, B, C, h0


@pytest.mark.parametrize("chunk", [1, 4, 8, 16, 64])
def test_chunked_scan_matches_sequential_reference(chunk):
    T = 29  # not a multiple of any chunk above 1
    inputs = [t.requires_grad_() for t in _inputs(T)]
    ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    y, state = ssd_scan(*inputs[:5], chunk, initial_state=inputs[5])
    y_ref, state_ref = ssd_scan_ref(*ref_inputs[:5], chunk, initial_state=ref_inputs[5])
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state, state_ref, atol=1e-4, rtol=1e-4)
    w = torch.randn_like(y)
    ((y * w).sum() + state.square().sum()).backward()
    ((y_ref * w).sum() + state_ref.square().sum()).backward()
    for name, a, b in zip(["x", "dt", "A", "B", "C", "initial_state"], inputs, ref_inputs):
        torch.testing.assert_close(a.grad, b.grad, atol=2e-3, rtol=2e-3, msg=name)


def test_chunked_scan_stays_exact_under_strong_decay():
    """Inside a chunk the decays come from differences of cumulative sums; with steps of dt*A down to
    -7.5 those sums reach about -260 over a 64-long chunk, and the outputs must still match the recurrence."""
    x, dt, A, B, C, _ = _inputs(128)
    dt, A = dt * 3, A * 3
    y, state = ssd_scan(x, dt, A, B, C, 64)
    y_ref, state_ref = ssd_scan_ref(x, dt, A, B, C)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state, state_ref, atol=1e-4, rtol=1e-4)


def test_scan_continues_from_a_final_state():
    x, dt, A, B, C, _ = _inputs(24)
    y_all, s_all = ssd_scan(x, dt, A, B, C, 8)
    y1, s1 = ssd_scan(x[:, :10], dt[:, :10], A, B[:, :10], C[:, :10], 8)
    y2, s2 = ssd_scan(x[:, 10:], dt[:, 10:], A, B[:, 10:], C[:, 10:], 8, initial_state=s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_all, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s2, s_all, atol=1e-4, rtol=1e-4)


def test_recurrent_step_matches_parallel_forward_token_by_token():
    torch.manual_seed(0)
    mixer = Mamba2(32, d_state=8, head_dim=16, expand=2, n_groups=2, chunk_size=4, d_conv=4)
    x = torch.randn(2, 13, 32)
    full = mixer(x)
    cache: dict = {}
    outs = [mixer(x[:, :2], cache=cache)]  # a prompt shorter than the conv window
    outs += [mixer(x[:, t:t + 1], cache=cache) for t in range(2, 13)]
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("recompute", [False, True])
def test_mamba_decoder_trains_and_generates_with_its_cache(recompute):
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, max_seq_len=32, mixers="MM", ssm_state=16, ssm_head_dim=16,
                      ssm_chunk=8, ssm_recompute=recompute)
    torch.manual_seed(0)
    model = build_model(cfg, 256)
    assert [m.recompute for m in model.modules() if isinstance(m, Mamba2)] == [recompute] * 2
    idx = torch.randint(0, 256, (4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        logits = model(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), idx[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0
    assert model.flops_per_token(32) > 6 * model.num_params()  # the scan is counted
    cached = generate(model, [1, 2, 3], 40, temperature=0)  # crosses max_seq_len, sliding the window
    model.new_cache = None  # the same model without its cache: re-reads the context every step
    assert generate(model, [1, 2, 3], 40, temperature=0) == cached


def test_causal_conv_equals_depthwise_conv1d():
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3)
    x = torch.randn(2, 9, 6, requires_grad=True)
    ours = causal_conv(x, conv.weight, conv.bias)
    ref = conv(x.transpose(1, 2))[..., :9].transpose(1, 2)
    torch.testing.assert_close(ours, ref)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(ours, (x, conv.weight, conv.bias), g)
    ref_grads = torch.autograd.grad(ref, (x, conv.weight, conv.bias), g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_gated_norm_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(0)
    y, z = (torch.randn(2, 5, 12, generator=g, dtype=torch.float64) for _ in range(2))
    w = torch.rand(12, generator=g, dtype=torch.float64) + 0.5
    inputs = tuple(t.clone().requires_grad_() for t in (y, z, w))
    assert torch.autograd.gradcheck(lambda a, b, c: gated_rms_norm(a, b, c, 3, 1e-5), inputs)


@pytest.mark.parametrize("compiled", [False, True])
def test_mamba_mixer_keeps_no_fp32_inner_width_tensor_for_backward(compiled):
    """The gated norm's fp32 work (z upcast for the SiLU, the normalized product) is recomputed in
    backward, in eager mode and under torch.compile, instead of being kept: 52 -> 40 MiB per 1024
    tokens for this mixer."""
    torch.manual_seed(0)
    mixer = Mamba2(64, d_state=16, head_dim=16, expand=2, chunk_size=16).to(torch.bfloat16)
    x = torch.randn(1, 64, 64, dtype=torch.bfloat16, requires_grad=True)
    run = compiled_for_saved(mixer) if compiled else mixer
    run(x).float().sum().backward()  # compile outside the count
    saved = saved_by_forward(run, x)
    inner = [t for t in saved if t.dtype == torch.float32 and t.shape[-1] == mixer.inner]
    assert saved and not inner, [tuple(t.shape) for t in inner]


def test_mamba_recompute_gives_the_same_gradients_and_keeps_a_fraction_for_backward():
    """model.ssm_recompute: conv and SSD scan rerun in backward from the in-projection's output: the
    same output and gradients (eager, fp32), and under torch.compile in bf16 no more than the
    in-projection's output kept, under a third of the plain mixer's bytes (measured for the
    gpt2-124m-sized mixer: 34.2 -> 6.3 KiB a token)."""
    torch.manual_seed(0)
    plain = Mamba2(64, d_state=16, head_dim=16, expand=2, chunk_size=16)
    lean = Mamba2(64, d_state=16, head_dim=16, expand=2, chunk_size=16, recompute=True)
    lean.load_state_dict(plain.state_dict())
    x = torch.randn(2, 40, 64, requires_grad=True)
    outs, grads = [], []
    for m in (plain, lean):
        out = m(x)
        (out.pow(2).sum() + out.sum()).backward()
        outs.append(out.detach())
        grads.append([x.grad.clone(), *(p.grad.clone() for p in m.parameters())])
        x.grad = None
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    for g, h in zip(grads[1], grads[0]):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # no backward to come: one forward, as without recompute
        torch.testing.assert_close(lean(x), outs[0], rtol=0, atol=0)

    kept = {}
    for m in (plain, lean):
        m.to(torch.bfloat16)
        run = compiled_for_saved(m)
        xb = torch.randn(1, 64, 64, dtype=torch.bfloat16, requires_grad=True)
        run(xb).float().sum().backward()  # compile outside the count
        kept[m.recompute] = kept_storage_bytes(run, m.parameters(), xb)
    in_proj_output = 64 * plain.in_proj.out_features * 2
    assert kept[True] <= in_proj_output * 1.1 and kept[True] * 3 < kept[False], kept


@pytest.mark.parametrize("mode", ["full", "ops"])
def test_mamba_recompute_nests_inside_block_checkpointing(mode):
    """ssm_recompute's checkpoint inside a checkpointed block (full or per-op): the plain model's loss
    and gradients."""
    from hasten.parallel.ac import apply_activation_checkpointing

    cfg = dict(dim=64, n_layers=2, n_heads=4, max_seq_len=32, mixers="M", ssm_state=16, ssm_head_dim=16, ssm_chunk=8)
    torch.manual_seed(0)
    plain = build_model(ModelConfig(**cfg), 256)
    nested = build_model(ModelConfig(**cfg, ssm_recompute=True), 256)
    nested.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(nested.layers, mode)
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    results = []
    for model in (plain, nested):
        logits = model(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), idx[:, 1:].reshape(-1))
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    for g, h in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_initial_state", [False, True])
def test_scan_matmuls_have_no_chunks_plus_one_dimension(with_initial_state):
    """State passing runs in chunk-count-sized matmuls: a (chunks + 1)-sized dimension (the initial
    state as an extra row) is padded by the GPU compiler with a copy of the operand (measured: a
    32 x 136 x 16384 copy, 2.2 ms of a 17.7 ms mixer step at 16k tokens on an H200)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    B, T, H, P, G, N, Q = 2, 64, 4, 8, 1, 16, 8  # 8 chunks
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(B, T, H, P, generator=g), torch.rand(B, T, H, generator=g), -torch.rand(H, generator=g),
            torch.randn(B, T, G, N, generator=g), torch.randn(B, T, G, N, generator=g))
    init = torch.randn(B, H, P, N, generator=g) if with_initial_state else None
    graph = make_fx(lambda *a: ssd_scan(*a, Q, initial_state=init))(*args).graph
    matmuls = [n for n in graph.nodes if n.target in (torch.ops.aten.bmm.default, torch.ops.aten.mm.default)]
    shapes = [tuple(a.meta["val"].shape) for n in matmuls for a in n.args]
    assert matmuls and not [s for s in shapes if T // Q + 1 in s], shapes
