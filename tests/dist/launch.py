"""Start real 2-rank gloo process groups for the tests: torch.multiprocessing (ranks forked from a
server), or torchrun in a subprocess."""

from __future__ import annotations

import faulthandler
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

from hasten.parallel.env import exit_rank


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, where: tuple[str, dict[str, str]], fn: Callable[..., Any],
            args: tuple[Any, ...]) -> None:
    faulthandler.enable()  # a crash in C++ still shows the rank's Python stack
    cwd, env = where  # the test's folder and environment at the call, not the fork server's from its start
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()
    exit_rank()  # the rank's work is done and checked by its outputs: as `hasten train` ends a torchrun rank


def spawn(fn: Callable[..., Any], *args: Any, world_size: int = 2) -> None:
    """Run fn(*args) on `world_size` ranks of a fresh gloo group; a failing rank fails the call.

    The ranks are forked from a server process that has imported torch and hasten once (forkserver,
    preloaded), not started afresh: a fresh rank spends ~4 s of CPU importing them, and the suite
    starts ~60 ranks on two cores."""
    mp.set_forkserver_preload(["hasten.api", "tests.dist.launch"])  # read when the server starts
    where = (os.getcwd(), dict(os.environ))
    mp.start_processes(_worker, args=(world_size, free_port(), where, fn, args), nprocs=world_size, join=True,
                       start_method="forkserver")


def train_ranks(overrides: list[str]) -> None:
    """What each rank runs: hasten.train on a config from the default recipe and `overrides`."""
    import hasten

    hasten.train(hasten.load_config("default", overrides))


def torchrun(*args: str, nproc: int = 2, env: dict[str, str], timeout: int = 240) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node N -m hasten ARGS` on this machine, as a user would type it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(free_port()), "-m", "hasten", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
