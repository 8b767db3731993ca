"""Resumable checkpoints with torch.distributed.checkpoint (DCP).

Layout: `<run>/checkpoints/step_0000100/` holds DCP shards of the model, optimizer and RNG
tensors, plus `trainer_state.json` (step, counters, loss scaler). A checkpoint is written into a
`.tmp` folder and renamed when complete, so a crash never leaves a half checkpoint that `resume =
"auto"` would pick. Every rank writes its own shards; a checkpoint written at world size N with
one strategy loads at world size M with any strategy (DCP reshards on load).
Nothing is loaded with pickle: DCP stores tensors, and the rest is JSON.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.optim import ZeroRedundancyOptimizer

from hasten.config import ConfigError
from hasten.parallel.ddp import load_zero1_state_dict, zero1_state_dict

STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    """What the loop needs, beyond tensors, to continue exactly where it stopped."""

    step: int = 0  # optimizer steps completed
    tokens_seen: int = 0
    skipped_steps: int = 0
    bad_loss_streak: int = 0
    train_seconds: float = 0.0  # training seconds in all (a schedule over time continues from them)
    scaler: dict[str, Any] = field(default_factory=dict)


def _quiet(fn: Any) -> Any:
    """DCP warns that it runs in a single process when no process group exists: that is intended."""
    def call(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            return fn(*args, **kwargs)
    return call


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _options(model: nn.Module) -> StateDictOptions:
    """Frozen weights (the base model under PEFT) are not saved: they come back from `model.from`,
    so a checkpoint holds only what training changes and stays small."""
    frozen = any(not p.requires_grad for p in model.parameters())
    return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen)


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """Model and optimizer state keyed by parameter name, sharded tensors as DTensors: the form
    in which DCP reshards a checkpoint to another world size or strategy."""
    if isinstance(optimizer, ZeroRedundancyOptimizer):  # ZeRO-1: each rank holds the states it owns
        return get_model_state_dict(model, options=_options(model)), zero1_state_dict(model, optimizer)
    return get_state_dict(model, optimizer, options=_options(model))


def _is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:07d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temp folders are ignored)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")
                  and not p.name.endswith(".tmp") and (p / STATE_FILE).exists())


def save_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: TrainerState, device: torch.device, keep: int) -> Path:
    """Write a complete checkpoint atomically and prune all but the newest `keep`."""
    final = checkpoint_dir(run_dir, state.step)
    tmp = final.with_name(final.name + ".tmp")
    if _is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    model_state, optim_state = _state_dicts(model, optimizer)
    tensors = {"model": model_state, "optim": optim_state, "rng": rng_state(device)}
    _quiet(dcp.save)(tensors, checkpoint_id=str(tmp))
    if _is_rank0():
        (tmp / STATE_FILE).write_text(json.dumps(state.__dict__, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def resolve_resume(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: none, the newest complete one ('auto'), or a given folder."""
    if resume == "none":
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).exists():
        raise ConfigError(f"train.resume={resume!r} is not a complete hasten checkpoint folder (no {STATE_FILE}).")
    return path


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    device: torch.device) -> TrainerState:
    """Load model (and optimizer, RNG) state in place and return the trainer state."""
    model_state, optim_state = _state_dicts(model, optimizer)
    tensors = {"model": model_state, "optim": optim_state, "rng": rng_state(device)}
    try:
        _quiet(dcp.load)(tensors, checkpoint_id=str(path))
    except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise ConfigError(f"Checkpoint {path} does not match this model or optimizer ({lines[-1][:300]}); "
                          "resume with the recipe it was trained with.") from None
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        set_model_state_dict(model, tensors["model"], options=_options(model))
        load_zero1_state_dict(model, optimizer, tensors["optim"])
    else:
        set_state_dict(model, optimizer, model_state_dict=tensors["model"], optim_state_dict=tensors["optim"],
                       options=_options(model))
    set_rng_state(tensors["rng"], device)
    return TrainerState(**json.loads((path / STATE_FILE).read_text()))


def load_model_weights(path: Path, model: nn.Module) -> None:
    """Load the model's weights that a checkpoint holds (for generate and export); an adapter-only
    checkpoint leaves the frozen base weights, already loaded from `model.from`, as they are."""
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    state = {"model": {k: v for k, v in model.state_dict().items() if f"model.{k}" in saved}}
    _quiet(dcp.load)(state, checkpoint_id=str(path))
    model.load_state_dict(state["model"], strict=len(state["model"]) == len(model.state_dict()))
