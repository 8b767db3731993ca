"""Assemble a run in the fixed order of DESIGN.md: config → data → model → precision → compile →
optimizer → loss → loop. Later method families (teacher, QAT, PEFT, parallel) insert their step
here, in that order; nothing is reordered silently.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hasten.config import ConfigError, RunConfig, save_config
from hasten.methods.precision import Precision, make_grad_scaler, resolve_precision
from hasten.optim import build_optimizer, build_schedule
from hasten.optim.schedule import Schedule

Batch = tuple[torch.Tensor, ...]
BatchFn = Callable[[int, int], Batch]  # (step, micro) -> batch on the CPU
LossFn = Callable[[nn.Module, Batch], torch.Tensor]  # (model, batch on device) -> scalar loss


def lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Next-token cross-entropy of a language model that maps ids_BT to logits_BTV."""
    inputs, targets = batch
    logits = model(inputs)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


@dataclass
class Run:
    """Everything the loop needs, built once. The loop owns no other state than its counters."""

    config: RunConfig
    run_dir: Path
    device: torch.device
    model: nn.Module
    loss_fn: LossFn
    train_batches: BatchFn
    val_batches: BatchFn | None
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    precision: Precision
    scaler: torch.amp.GradScaler | None
    tokens_per_micro_batch: int
    flops_per_token: float | None = None
    tokenizer: Any = None
    info: dict[str, Any] = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but no CUDA GPU is visible; use train.device=cpu or auto.")
    return device


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def prepare_run_dir(config: RunConfig, rank: int) -> Path:
    """Create the run folder and save the resolved config; a fresh run clears an old run's state."""
    run_dir = Path(config.train.out_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if config.train.resume == "none":
            for stale in ("checkpoints", "tensorboard"):
                shutil.rmtree(run_dir / stale, ignore_errors=True)
            for stale in ("metrics.jsonl", "summary.json", "loss.png"):
                (run_dir / stale).unlink(missing_ok=True)
        save_config(config, run_dir / "config.toml")
    return run_dir


def _token_batches(tokens: Any, config: RunConfig, seed: int, rank: int, world: int, pin: bool) -> BatchFn:
    from hasten.data import WindowSampler

    sampler = WindowSampler(tokens, config.train.seq_len, config.train.batch_size, seed=seed, rank=rank,
                            world_size=world, pin_memory=pin)
    return sampler.batch


def _build_lm(config: RunConfig, run_dir: Path, device: torch.device, rank: int, world: int) -> dict[str, Any]:
    """Data and model for hasten's own language-model runs."""
    from hasten.data import prepare_data, unigram_cross_entropy
    from hasten.models import build_model, resolve_vocab_size

    data = prepare_data(config.data)
    if rank == 0:
        data.tokenizer.save(run_dir / "tokenizer")
    vocab_size = resolve_vocab_size(config.model, data.tokenizer.vocab_size)
    torch.manual_seed(config.train.seed)
    model = build_model(config.model, vocab_size, device)
    pin = device.type == "cuda"
    return dict(
        model=model, tokenizer=data.tokenizer, loss_fn=lm_loss,
        train_batches=_token_batches(data.train, config, config.train.seed, rank, world, pin),
        val_batches=_token_batches(data.val, config, config.train.seed + 1, rank, world, pin),
        flops_per_token=model.flops_per_token(config.train.seq_len),
        info=dict(train_tokens=int(len(data.train)), val_tokens=int(len(data.val)),
                  unigram_val_loss=unigram_cross_entropy(data.train, data.val, data.tokenizer.vocab_size),
                  params=model.num_params(), vocab_size=vocab_size, tokenizer=data.tokenizer.name),
    )


def _items_per_batch(train_batches: BatchFn) -> int:
    """What a user batch counts for throughput: token ids (an integer first tensor) count one each,
    otherwise each row of the first tensor is one item."""
    first = train_batches(0, 0)[0]
    return first.numel() if not (first.is_floating_point() or first.is_complex()) else first.shape[0]


def build_run(config: RunConfig, *, model: nn.Module | None = None, loss_fn: LossFn | None = None,
              train_batches: BatchFn | None = None, val_batches: BatchFn | None = None) -> Run:
    """Build a run. Without a model, hasten builds its decoder and token data from the config;
    with one, the caller supplies `loss_fn` and `train_batches` (and optionally `val_batches`)."""
    rank, world = _rank_and_world()
    device = resolve_device(config.train.device)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    run_dir = prepare_run_dir(config, rank)
    if model is None:
        parts = _build_lm(config, run_dir, device, rank, world)
        parts["tokens_per_micro_batch"] = config.train.batch_size * config.train.seq_len
    else:
        if loss_fn is None or train_batches is None:
            raise ConfigError("A user model needs loss_fn(model, batch) and train_batches(step, micro) as well.")
        model.to(device)
        parts = dict(model=model, loss_fn=loss_fn, train_batches=train_batches, val_batches=val_batches,
                     tokenizer=None, flops_per_token=None, tokens_per_micro_batch=_items_per_batch(train_batches),
                     info=dict(params=sum(p.numel() for p in model.parameters())))
    precision = resolve_precision(config.precision, device)
    select_attention_backend(config.train.attention_backend, device)
    optimizer = build_optimizer(parts["model"], config.optim, device)
    return Run(config=config, run_dir=run_dir, device=device, optimizer=optimizer,
               schedule=build_schedule(config.optim, config.train.steps), precision=precision,
               scaler=make_grad_scaler(precision, config.precision),
               rank=rank, world_size=world, **parts)


def compiled_loss(run: Run) -> Callable[[Batch], torch.Tensor]:
    """The forward + loss function the loop calls; compiled as one graph when train.compile is set,
    so the loss fuses with the output head instead of materializing fp32 logits."""
    fn = functools.partial(run.loss_fn, run.model)
    if run.config.train.compile:
        mode = run.config.train.compile_mode
        fn = torch.compile(fn, mode=None if mode == "default" else mode)
    return fn


def select_attention_backend(name: str, device: torch.device) -> None:
    """Restrict SDPA to one kernel family (process-wide, as PyTorch's flags are). `auto` leaves
    PyTorch's own order; cuDNN attention is often the fastest on Hopper but not PyTorch's first pick."""
    if name == "auto" or device.type != "cuda":
        return
    torch.backends.cuda.enable_flash_sdp(name == "flash")
    torch.backends.cuda.enable_cudnn_sdp(name == "cudnn")
    torch.backends.cuda.enable_mem_efficient_sdp(name == "efficient")
    torch.backends.cuda.enable_math_sdp(name == "math")

