"""Muon on FSDP2-sharded (DTensor) parameters, on a real 2-rank gloo group.

Tolerances. The sharded step gathers each matrix and runs the same Newton-Schulz on it as one
process, and its momentum arithmetic is the same per element: given the same gradients it gives
the same bits, which the first test asserts. Under FSDP2 the gradients differ slightly: each
rank's half-batch gradient is averaged by reduce-scatter, which sums in another order than one
process (~1e-7 relative in fp32). Newton-Schulz runs in bf16 (8-bit mantissa), so such a
difference can flip the rounding of an input and move outputs by about one bf16 step, ~4e-3 of an
update element; the updates here are ~5e-3 per step, so a flip moves a weight by ~2e-5.
Hence weights within 1e-4 + 1e-3 relative (measured here: Muon's matrices identical, AdamW's
parameters within 2e-7). In the training runs the one-process step orthogonalizes each shape's
matrices as one batch and the sharded one matrix by matrix, which may round apart: losses within
1e-4 relative (measured: 8e-6 after 4 steps). Orthogonalizing each rank's shard on its own instead of the whole
matrix moves weights by 1.5e-2 and the loss by 4e-4 at step 2 and 2.6e-3 at step 4.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import hasten
from hasten.config import OptimConfig
from hasten.optim import CombinedOptimizer, MuonNS, build_optimizer, muon_params
from hasten.parallel import shard
from hasten.train.checkpoint import TrainerState, list_checkpoints, load_checkpoint, save_checkpoint
from tests.dist.launch import spawn, train_ranks
from tests.dist.test_strategies import B, COMMON, cache, losses  # noqa: F401 (cache: fixture)

CPU = torch.device("cpu")
# Over 2 ranks: even rows, uneven rows (4 + 3), a tall matrix, and one row (rank 1's shard is empty).
SHAPES = [(6, 10), (7, 5), (9, 4), (1, 6)]
PARAM_ATOL, PARAM_RTOL = 1e-4, 1e-3
LOSS_RTOL = 1e-4


def _grad(shape: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _sharded_matrix_steps_equal_unsharded() -> None:
    mesh = init_device_mesh("cpu", (2,))
    rank = dist.get_rank()
    for shape in SHAPES:
        whole = _grad(shape, 100)
        plain, sharded = nn.Parameter(whole.clone()), nn.Parameter(distribute_tensor(whole, mesh, [Shard(0)]))
        rows = torch.chunk(torch.arange(shape[0]), 2)  # FSDP2's and DTensor's split of dim 0
        assert sharded.to_local().shape[0] == (len(rows[rank]) if rank < len(rows) else 0)
        a, b = (MuonNS([p], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw") for p in (plain, sharded))
        for seed in range(3):
            plain.grad = _grad(shape, seed)
            sharded.grad = distribute_tensor(plain.grad, mesh, [Shard(0)])
            a.step()
            b.step()
        buf = b.state[sharded]["momentum_buffer"]
        assert isinstance(buf, DTensor) and buf.placements == (Shard(0),)  # the state stays sharded
        assert torch.equal(buf.full_tensor(), a.state[plain]["momentum_buffer"])
        assert torch.equal(sharded.full_tensor(), plain.detach()), shape


def _mlp() -> nn.Module:
    torch.manual_seed(0)  # the same weights on every rank, as hasten initializes them
    # Hidden matrices of 15 and 9 rows shard unevenly over 2 ranks; the head goes to AdamW.
    return nn.Sequential(nn.Linear(8, 15), nn.Tanh(), nn.Linear(15, 9), nn.Tanh(), nn.Linear(9, 3))


def _muon_ns(model: nn.Module) -> torch.optim.Optimizer:
    """Muon on the hidden matrices, AdamW on the head, split as build_muon splits them."""
    matrices = muon_params(model)
    head = [p for p in model.parameters() if all(p is not m for m in matrices)]
    return CombinedOptimizer([MuonNS(matrices, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"),
                              torch.optim.AdamW(head, lr=0.02, foreach=True)])


def _batch_loss(model: nn.Module, step: int, rows: slice = slice(None)) -> torch.Tensor:
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(step))[rows]
    return ((model(x) - x[:, :3]) ** 2).mean()


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range, rows: slice = slice(None)) -> None:
    for step in steps:
        _batch_loss(model, step, rows).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t.detach()


def _fsdp_muon_matches_one_process_and_checkpoints(strategy: str, run_dir: str) -> None:
    rank = dist.get_rank()
    half = slice(4 * rank, 4 * rank + 4)  # this rank's half of the global batch of 8
    reference, model = _mlp(), shard(_mlp(), strategy)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    built = build_optimizer(model, OptimConfig(name="muon"), CPU)
    assert isinstance(built.optimizers[0], MuonNS)  # torch.optim.Muon does not gather sharded matrices

    expected, optimizer = _muon_ns(reference), _muon_ns(model)
    _train(reference, expected, range(3))
    _train(model, optimizer, range(3), half)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=PARAM_RTOL, atol=PARAM_ATOL)

    # hasten's checkpoint (DCP, get_state_dict): the sharded momentum comes back into a fresh run
    path = save_checkpoint(Path(run_dir), model, optimizer, TrainerState(step=3), CPU, keep=1)
    resumed = shard(_mlp(), strategy)
    resumed_optimizer = _muon_ns(resumed)
    load_checkpoint(path, resumed, resumed_optimizer, CPU)
    for p, q in zip(model.parameters(), resumed.parameters()):
        state, loaded = optimizer.state[p], resumed_optimizer.state[q]
        assert state.keys() == loaded.keys()
        for key, value in state.items():
            assert type(loaded[key]) is type(value)
            assert torch.equal(_whole(loaded[key]), _whole(value)), key
    _train(model, optimizer, range(3, 5), half)
    _train(resumed, resumed_optimizer, range(3, 5), half)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p.full_tensor(), q.full_tensor())


def test_sharded_matrix_update_equals_the_unsharded_one():
    spawn(_sharded_matrix_steps_equal_unsharded)


def test_fsdp2_muon_matches_one_process_and_resumes(tmp_path):
    # zero3 only: zero2 differs in when FSDP2 reshards, not in the sharded parameters the optimizer
    # steps (the training test below runs both).
    spawn(_fsdp_muon_matches_one_process_and_checkpoints, "zero3", str(tmp_path))


# --- the training path ----------------------------------------------------------------------------

MUON = [*COMMON, "optim.name=muon", "train.steps=4", "checkpoint.every=2", "checkpoint.keep=2"]


@pytest.fixture(scope="module")
def single(cache):
    out = cache / "single"
    hasten.train(hasten.load_config("default", [*MUON, f"train.batch_size={2 * B}", f"train.out_dir={out}"]))
    return out


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_config_accepts_muon_with_sharded_parameters(strategy):
    config = hasten.load_config("default", ["optim.name=muon", f"parallel.strategy={strategy}"])
    assert config.parallel.strategy == strategy


def test_two_rank_zero3_muon_trains_like_one_process_and_resumes_there(cache, single):
    out = cache / "zero3"
    spawn(train_ranks, [*MUON, f"train.batch_size={B}", f"train.out_dir={out}", "parallel.strategy=zero3"])
    ref, got = losses(single), losses(out)
    assert sorted(got) == [1, 2, 3, 4] and ref[4] < ref[1]
    assert got == pytest.approx(ref, rel=LOSS_RTOL)
    # the sharded momentum, resharded by DCP into one process
    resumed_out = cache / "zero3-in-one"
    hasten.train(hasten.load_config("default", [*MUON, f"train.batch_size={2 * B}", f"train.out_dir={resumed_out}",
                                                f"train.resume={list_checkpoints(out)[0]}"]))
    resumed = losses(resumed_out)
    assert sorted(resumed) == [3, 4]
    assert resumed == pytest.approx({s: got[s] for s in (3, 4)}, rel=LOSS_RTOL)


def test_one_process_muon_checkpoint_resumes_on_two_ranks_with_zero2(cache, single):
    out = cache / "zero2"
    spawn(train_ranks, [*MUON, f"train.batch_size={B}", f"train.out_dir={out}",
                        f"train.resume={list_checkpoints(single)[0]}", "parallel.strategy=zero2"])
    ref, got = losses(single), losses(out)
    assert sorted(got) == [3, 4]
    assert got == pytest.approx({s: ref[s] for s in (3, 4)}, rel=LOSS_RTOL)
