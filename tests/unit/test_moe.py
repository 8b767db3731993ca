"""MoE: router losses against their formulas, grouped (sorted) dispatch vs the per-expert loop,
dropless routing and capacity drops, and the decoder's active-parameter FLOPs."""

from __future__ import annotations

import math

import pytest
import torch

from hasten.config import ModelConfig
from hasten.models import MoE, build_model, load_balancing_loss, route, router_z_loss
from hasten.models.moe import auxiliary_losses, dispatch_plan, top_k_of
from hasten.models.ops import expert_swiglu_ref


def _pair(**kw) -> tuple[MoE, MoE]:
    torch.manual_seed(0)
    grouped = MoE(32, 48, impl="grouped", **kw)
    loop = MoE(32, 48, impl="loop", **kw)
    loop.load_state_dict(grouped.state_dict())
    return grouped, loop


def test_load_balancing_loss_hand_example():
    probs = torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.1, 0.6, 0.2, 0.1], [0.5, 0.1, 0.3, 0.1], [0.2, 0.2, 0.2, 0.4]])
    mask = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]])
    f = torch.tensor([2, 1, 0, 1]) / 4
    P = probs.mean(0)
    torch.testing.assert_close(load_balancing_loss(probs, mask), 4 * (f * P).sum())
    uniform = torch.full((8, 4), 0.25)
    balanced = torch.eye(4).repeat(2, 1)
    torch.testing.assert_close(load_balancing_loss(uniform, balanced), torch.tensor(1.0))


def test_router_z_loss_hand_example():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    expected = (math.log(2) ** 2 + math.log(math.e + math.e**2) ** 2) / 2
    torch.testing.assert_close(router_z_loss(logits), torch.tensor(expected))


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_route_weights(router):
    logits = torch.randn(10, 6)
    weights, experts, probs = route(logits, 2, router)
    assert experts.shape == (10, 2) and (experts[:, 0] != experts[:, 1]).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(10))
    torch.testing.assert_close(probs.sum(-1), torch.ones(10))
    top1_w, _, _ = route(logits, 1, "softmax")  # Switch: the raw probability, so the router gets gradient
    torch.testing.assert_close(top1_w[:, 0], logits.softmax(-1).max(-1).values)


@pytest.mark.parametrize("kw", [dict(), dict(router="sigmoid", shared_expert=True), dict(top_k=1),
                                dict(capacity_factor=0.5)])
def test_grouped_matches_loop_outputs_and_grads(kw):
    grouped, loop = _pair(**kw)
    x = torch.randn(3, 11, 32)
    xg, xl = x.clone().requires_grad_(), x.clone().requires_grad_()
    yg, yl = grouped(xg), loop(xl)
    torch.testing.assert_close(yg, yl, atol=1e-5, rtol=1e-5)
    (yg.square().sum() + sum(w * v for w, v in grouped.aux_losses.values())).backward()
    (yl.square().sum() + sum(w * v for w, v in loop.aux_losses.values())).backward()
    torch.testing.assert_close(xg.grad, xl.grad, atol=1e-5, rtol=1e-5)
    for (name, pg), pl in zip(grouped.named_parameters(), loop.parameters()):
        torch.testing.assert_close(pg.grad, pl.grad, atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(grouped.aux_metrics["moe_dropped"], loop.aux_metrics["moe_dropped"])


def test_dropless_routes_every_token():
    moe, _ = _pair()
    moe(torch.randn(2, 16, 32))
    assert moe.tokens_per_expert.sum().item() == 2 * 16 * 2
    assert moe.aux_metrics["moe_dropped"].item() == 0.0


def test_capacity_drops_are_counted():
    # 6 tokens, all choosing expert 0 first and expert 1 second; capacity 1.0 * 6 * 2 / 4 = 3
    experts = torch.tensor([[0, 1]] * 6)
    dest, keep, offs, counts, rows = dispatch_plan(experts, 4, capacity=3)
    assert counts.tolist() == [6, 6, 0, 0]
    assert (~keep).sum().item() == 6  # 3 of 6 dropped at each of the two experts
    assert keep.view(2, 6)[:, :3].all() and not keep.view(2, 6)[:, 3:].any()  # earlier tokens win
    assert offs.tolist() == [16, 32, 32, 32] and (dest[~keep] == rows - 1).all()
    # and through the layer: a router that sends every token to experts 0 and 1
    for impl in ("grouped", "loop"):
        moe = MoE(8, 16, num_experts=4, top_k=2, capacity_factor=1.0, impl=impl)
        with torch.no_grad():
            moe.router.weight.zero_()
            moe.router.weight[0, 0], moe.router.weight[1, 0] = 10.0, 5.0
        moe(torch.ones(1, 6, 8))
        assert moe.aux_metrics["moe_dropped"].item() == 0.5


def test_dispatch_places_each_expert_in_its_own_aligned_group():
    experts = torch.randint(0, 4, (50, 2))
    dest, keep, offs, counts, rows = dispatch_plan(experts, 4, capacity=100)
    starts = torch.cat([torch.zeros(1, dtype=offs.dtype), offs[:-1]])
    flat = experts.t().reshape(-1)
    assert keep.all() and len(set(dest.tolist())) == 100 and (starts % 16 == 0).all()
    assert ((dest >= starts[flat]) & (dest < offs[flat])).all()


def test_expert_swiglu_ref_matches_dense_per_group():
    w1, w3, w2 = torch.randn(2, 8, 4), torch.randn(2, 8, 4), torch.randn(2, 4, 8)
    x = torch.randn(32, 4)
    out = expert_swiglu_ref(x, torch.tensor([16, 32], dtype=torch.int32), w1, w3, w2)
    e1 = torch.nn.functional.silu(x[16:] @ w1[1].T) * (x[16:] @ w3[1].T) @ w2[1].T
    torch.testing.assert_close(out[16:], e1)


def _grouped_kernel_runs_here() -> bool:
    from hasten.models.ops import grouped_gemm
    try:
        grouped_gemm._GROUPED_MM(torch.zeros(16, 8, dtype=torch.bfloat16), torch.zeros(1, 8, 8, dtype=torch.bfloat16),
                                 offs=torch.tensor([16], dtype=torch.int32))
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


@pytest.mark.skipif(not _grouped_kernel_runs_here(), reason="this torch has no grouped GEMM on the CPU")
def test_grouped_expert_swiglu_matches_per_group_matmuls_with_gradients():
    """The grouped path (gate and up stacked into one GEMM) against one matmul per group, in bf16."""
    from hasten.models.ops import expert_swiglu
    torch.manual_seed(0)
    offs = torch.tensor([16, 16, 48], dtype=torch.int32)  # the middle expert gets no rows
    x = torch.randn(48, 16, dtype=torch.bfloat16)
    weights = [0.3 * torch.randn(3, 24, 16), 0.3 * torch.randn(3, 24, 16), 0.3 * torch.randn(3, 16, 24)]
    results = []
    for fn in (expert_swiglu, expert_swiglu_ref):
        xs = x.clone().requires_grad_()
        ws = [w.clone().requires_grad_() for w in weights]
        y = fn(xs, offs, *ws)
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append([y, xs.grad, *(w.grad for w in ws)])
    for got, want in zip(*results):
        torch.testing.assert_close(got.float(), want.float(), atol=0.05, rtol=0.02)
    assert results[0][3][1].abs().sum() == 0  # no rows, no gradient for the empty expert


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_of_equals_torch_topk_with_gradients(k):
    torch.manual_seed(k)
    scores = torch.randn(64, 8).softmax(-1).requires_grad_()
    ref = scores.detach().clone().requires_grad_()
    values, idx = top_k_of(scores, k)
    ref_values, ref_idx = ref.topk(k, dim=-1)
    assert torch.equal(idx, ref_idx) and torch.equal(values, ref_values)
    weights = torch.randn(64, k)
    (values * weights).sum().backward()
    (ref_values * weights).sum().backward()
    assert torch.equal(scores.grad, ref.grad)


def test_dispatch_plan_compiles_without_graph_breaks():
    """bincount's data-dependent size used to split the compiled graph at every MoE layer."""
    experts = torch.randint(0, 8, (64, 2))
    explanation = torch._dynamo.explain(dispatch_plan)(experts, 8, 128)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_decoder_collects_aux_losses_and_counts_active_params():
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, max_seq_len=32, ffns="EE", num_experts=4, top_k=1,
                      moe_hidden_dim=64)
    dense = build_model(ModelConfig(dim=64, n_layers=2, n_heads=4, max_seq_len=32, ffn_dim=64), 256)
    model = build_model(cfg, 256)
    model(torch.randint(0, 256, (2, 16)))
    total, terms = auxiliary_losses(model)
    assert total is not None and total.requires_grad
    assert set(terms) == {"moe_balance", "moe_z", "moe_dropped", "moe_max_load"}
    # one expert of width 64 is active: the same FFN weights as a dense model of ffn_dim=64 (+ routers)
    assert model.num_active_params() == dense.num_params() + 2 * 4 * 64
    assert model.flops_per_token(32) == 6 * model.num_active_params() + 12 * 2 * 64 * 32
    model.eval()
    model(torch.randint(0, 256, (2, 16)))
    assert auxiliary_losses(model) == (None, {})


def test_routed_scale_multiplies_the_routed_experts_only():
    """routed_scale (DeepSeek's routed scaling factor) scales the routed experts' weighted sum;
    the shared expert is added unscaled, and routing is unchanged."""
    torch.manual_seed(0)
    plain = MoE(32, 48, shared_expert=True)
    scaled = MoE(32, 48, shared_expert=True, routed_scale=2.5)
    scaled.load_state_dict(plain.state_dict())
    x = torch.randn(2, 7, 32)
    shared = plain.shared(x)
    torch.testing.assert_close(scaled(x) - shared, 2.5 * (plain(x) - shared), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scaled.tokens_per_expert, plain.tokens_per_expert)
