"""Before any rank trains: a node given more ranks than GPUs fails with one sentence, and importing
hasten leaves CUDA unstarted (a process that imported it can still fork ranks that use the GPU)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from hasten.config import ConfigError
from hasten.parallel import env


def test_more_ranks_on_a_node_than_gpus_fail_with_one_sentence(monkeypatch):
    for name, value in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT="29500").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # a node with one GPU

    def set_device(index):
        raise AssertionError(f"set_device({index}) reached")  # CUDA's own error would be 'invalid device ordinal'

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    with pytest.raises(ConfigError, match=r"rank 1 has local rank 1 and so needs GPU 1, but this machine shows 1 GPU: "
                                          r"launch at most 1 process per node \(torchrun --nproc-per-node 1\)"):
        env.init_distributed(torch.device("cuda"))


def test_importing_hasten_starts_no_cuda():
    """torch.cuda.is_available() starts CUDA's driver, after which a forked child cannot use the GPU;
    hasten's import-time checks ask torch.cuda.device_count() (NVML) instead."""
    code = ("import torch\n"
            "def refuse(*args, **kwargs):\n"
            "    raise RuntimeError('torch.cuda.is_available() called at import')\n"
            "torch.cuda.is_available = refuse\n"
            "import hasten.api, hasten.train.loop, hasten.models.ops.add_norm, hasten.models.ops.projections\n"
            "print('imported')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "imported", out.stderr[-2000:]
