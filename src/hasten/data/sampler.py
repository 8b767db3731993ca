"""Random windows of a flat token array, as a pure function of (seed, step, micro, rank, world size).

No iterator state means nothing to checkpoint: resuming at step k replays exactly the batches an
uninterrupted run would have seen. All ranks draw the same global batch of offsets and each keeps
its own rows, so ranks read disjoint windows and the global batch does not depend on how it is split.
"""

from __future__ import annotations

import numpy as np
import torch

from hasten.config import ConfigError


class WindowSampler:
    """Batches of `batch_size` windows of `seq_len + 1` tokens, split into inputs and next-token targets."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, pin_memory: bool = False) -> None:
        if len(tokens) < seq_len + 2:
            raise ConfigError(f"The token array has {len(tokens)} tokens, fewer than seq_len + 2 = {seq_len + 2}; "
                              "lower train.seq_len or use more data (data.source, data.max_documents).")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if pin_memory and not torch.cuda.is_available():
            raise ValueError("pin_memory=True needs CUDA; pass pin_memory=False on machines without a GPU.")
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.pin_memory = pin_memory
        self._window = np.arange(seq_len + 1)

    def offsets(self, step: int, micro: int = 0) -> np.ndarray:
        """Start offsets of this rank's windows: its slice of the global batch's offsets."""
        rng = np.random.Generator(np.random.PCG64([self.seed, step, micro]))
        high = len(self.tokens) - self.seq_len - 1
        starts = rng.integers(0, high, size=self.world_size * self.batch_size, endpoint=True)
        return starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), int64 [batch_size, seq_len]; targets are the inputs shifted left by one."""
        windows = self.tokens[self.offsets(step, micro)[:, None] + self._window]
        x = torch.from_numpy(windows[:, :-1].astype(np.int64))
        y = torch.from_numpy(windows[:, 1:].astype(np.int64))
        if self.pin_memory:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y
