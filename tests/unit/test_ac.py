"""Activation checkpointing modes on a tiny decoder: the same loss and gradients as without, and
what each mode runs again in the backward pass (counted at the dispatcher)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tests.saved import kept_for_backward, nbytes

from hasten.config import ModelConfig
from hasten.models import build_model
from hasten.parallel.ac import apply_activation_checkpointing, chosen_blocks


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _run(mode: str, fraction: float = 1.0) -> tuple[torch.Tensor, list[torch.Tensor], Counter, int]:
    torch.manual_seed(0)
    model = build_model(ModelConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=32), 64, "cpu")
    checkpointed = apply_activation_checkpointing(model.layers, mode, fraction)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
    with _CountOps() as backward_ops:
        loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()], backward_ops.counts, checkpointed


def test_chosen_blocks_spread_evenly():
    assert chosen_blocks(22, 1.0) == list(range(22))
    assert chosen_blocks(22, 0.5) == list(range(0, 22, 2))
    assert chosen_blocks(22, 0.15) == [0, 7, 14]
    assert chosen_blocks(4, 0.01) == [0]
    assert chosen_blocks(5, 0.5) == [0, 1, 3]  # 2.5 rounds up


@pytest.mark.parametrize("mode", ["full", "selective", "ops"])
def test_checkpointing_keeps_loss_and_gradients(mode):
    loss, grads, _, _ = _run("none")
    loss_ac, grads_ac, _, _ = _run(mode)
    torch.testing.assert_close(loss_ac, loss, rtol=0, atol=0)
    for g, g_ac in zip(grads, grads_ac):
        torch.testing.assert_close(g_ac, g, rtol=1e-6, atol=1e-7)


def test_ops_mode_reruns_element_wise_work_but_no_matmul():
    *_, plain, _ = _run("none")
    *_, full, n_full = _run("full")
    *_, ops, n_ops = _run("ops")
    *_, half, n_half = _run("ops", 0.5)
    n_layers = n_full
    assert n_ops == n_layers and n_half == n_layers // 2
    matmuls = lambda counts: counts["mm"] + counts["bmm"] + counts["addmm"]  # noqa: E731
    assert matmuls(full) > matmuls(plain)  # whole blocks run forward again
    assert matmuls(ops) == matmuls(plain)  # matmul outputs kept
    attention = lambda counts: sum(n for op, n in counts.items() if op.startswith("_scaled_dot_product"))  # noqa: E731
    assert attention(full) > attention(plain) and attention(ops) == attention(plain)
    # the norms' rsqrt runs again in the backward pass of every checkpointed block
    assert plain["rsqrt"] < half["rsqrt"] < ops["rsqrt"]


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_whole_block_checkpointing_compiles(mode):
    """torch.compile refused checkpoint(..., context_fn=noop_context_fn) passed explicitly."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(dim=32, n_layers=2, n_heads=2, max_seq_len=16), 32, "cpu")
    plain = build_model(ModelConfig(dim=32, n_layers=2, n_heads=2, max_seq_len=16), 32, "cpu")
    plain.load_state_dict(model.state_dict())
    apply_activation_checkpointing(model.layers, mode)
    idx = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model, backend="aot_eager")  # the partitioner sees the checkpoint regions
    loss = compiled(idx).float().pow(2).mean()
    loss.backward()
    want = plain(idx).float().pow(2).mean()
    want.backward()
    torch.testing.assert_close(loss, want)
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


def _saved_bytes_compiled_lora(mode: str) -> tuple[int, torch.Tensor, list[torch.Tensor]]:
    """Bytes a compiled bf16 LoRA decoder keeps for backward (weights excluded), its loss and grads."""
    pytest.importorskip("peft")
    from hasten.config import PeftConfig
    from hasten.methods import peft

    torch.manual_seed(0)
    model = build_model(ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=176, max_seq_len=64), 64)
    model = peft.apply(model, PeftConfig(method="lora", rank=8, alpha=16))
    peft.cast_frozen(model, torch.bfloat16)
    apply_activation_checkpointing(model.layers, mode)
    idx = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(1))

    def loss_fn(idx):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(idx[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten())

    acts, loss = kept_for_backward(loss_fn, model.parameters(), idx)
    kept = nbytes(acts)
    return kept, loss.detach(), [p.grad for p in model.parameters() if p.grad is not None]


@pytest.mark.skipif(torch.torch_version.TorchVersion(torch.__version__) < "2.13",
                    reason="PyTorch 2.13's partitioner: under 2.11 `ops` keeps 1.19x of none here (docs/distributed.md)")
def test_ops_under_compile_keeps_less_than_no_checkpointing_for_lora():
    """Compiled, `ops` leaves matmul outputs to the partitioner and keeps 16-bit sums: a LoRA layer's
    frozen projection and adapter output are no longer both forced in."""
    plain, loss, grads = _saved_bytes_compiled_lora("none")
    ops, loss_ops, grads_ops = _saved_bytes_compiled_lora("ops")
    assert ops < 0.8 * plain, (ops, plain)
    torch.testing.assert_close(loss_ops, loss)
    for g, g_ops in zip(grads, grads_ops):
        torch.testing.assert_close(g_ops, g, rtol=1e-3, atol=1e-4)
