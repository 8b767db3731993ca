"""The process group of a torchrun launch: start it from torchrun's environment, pick the device, end it.

hasten never launches processes itself: `torchrun` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
and MASTER_PORT, and `init_distributed` only reads them. NCCL talks between GPUs, gloo between CPUs.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from typing import NoReturn

import torch
import torch.distributed as dist

from hasten.config import ConfigError

_STARTED_HERE = False  # whether hasten created the group (and so should destroy it)


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device) -> torch.device:
    """A GPU run gives each process the GPU of its local rank (cuda:LOCAL_RANK) unless one is named."""
    if device.type == "cuda" and device.index is None and dist.is_initialized():
        return torch.device("cuda", local_rank())
    return device


def init_distributed(device: torch.device) -> bool:
    """Start the default process group from torchrun's variables; True when one is running afterwards.

    A group the caller already started (torch.multiprocessing, a user's own script) is used as is.
    """
    global _STARTED_HERE
    if dist.is_initialized():
        return True
    if not launched_by_torchrun():
        return False
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        if local_rank() >= visible:
            raise ConfigError(f"rank {os.environ['RANK']} has local rank {local_rank()} and so needs GPU {local_rank()}, "
                              f"but this machine shows {visible} GPU{'s' * (visible != 1)}: launch at most {visible} "
                              f"process{'es' * (visible != 1)} per node (torchrun --nproc-per-node {visible}), or "
                              "train on the CPU (train.device=cpu).")
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend_for(device), timeout=datetime.timedelta(minutes=30),
                            device_id=torch.device("cuda", local_rank()) if device.type == "cuda" else None)
    _STARTED_HERE = True
    return True


def shutdown_distributed() -> bool:
    """Destroy the process group if hasten started it (True then); a group the caller owns is left alone."""
    global _STARTED_HERE
    ended = _STARTED_HERE and dist.is_initialized()
    if ended:
        dist.barrier()  # no rank tears the group down while another still has collectives in flight
        dist.destroy_process_group()
    _STARTED_HERE = False
    return ended


def exit_rank() -> NoReturn:
    """End a rank the way multiprocessing ends its children: flush, then `os._exit(0)`, skipping Python's teardown.

    After the process group is destroyed, a gloo worker thread can still hold the last reference to a
    tensor of the last collective (the summary's all-gather, say); when it drops it while the interpreter
    finalizes, it takes the GIL and the rank aborts ("terminate called without an active exception",
    a few runs in a hundred on two CPU ranks), so torchrun reports a failed run that had finished.
    Call it once everything the rank writes is closed.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
