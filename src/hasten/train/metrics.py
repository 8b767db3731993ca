"""Throughput, model FLOPs utilization and memory: what every run reports."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch

# Dense (no sparsity) datasheet peaks in FLOP/s, by device-name substring and precision.
# H100/H200 SXM: 989 TFLOP/s bf16/fp16, 67 TFLOP/s plain fp32. A100: 312 and 19.5.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12},
    "A10G": {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12},
    "RTX 4090": {"bf16": 165e12, "fp16": 165e12, "fp32": 82.6e12},
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The datasheet peak of the device for a precision, or None where unknown (CPUs)."""
    if device.type != "cuda":
        return None
    name = device_name(device)
    for key, peaks in PEAK_FLOPS.items():
        if key in name:
            return peaks.get(precision)
    return None


def cluster_peak_flops(device: torch.device, precision: str, world_size: int) -> float | None:
    """The peak of all ranks together (one device each): the denominator of a run's MFU, whose
    tokens/s are the global batch's."""
    peak = peak_flops(device, precision)
    return peak * world_size if peak is not None else None


def mfu(tokens_per_second: float, flops_per_token: float | None, peak: float | None) -> float | None:
    """Model FLOPs utilization: achieved model FLOP/s over the datasheet peak; None where either is
    unknown (a CPU; a PEFT step, whose FLOPs 6N over all weights does not describe)."""
    if peak is None or not flops_per_token or tokens_per_second <= 0:
        return None
    return tokens_per_second * flops_per_token / peak


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters, each once (a tied embedding and head count once); a
    quantized weight (a tensor subclass) counts its integer data, scales and zero points."""
    total = 0
    for param in model.parameters():
        flatten = getattr(param, "__tensor_flatten__", None)
        parts = [getattr(param, name) for name in flatten()[0]] if flatten else [param]
        total += sum(p.numel() * p.element_size() for p in parts)
    return total


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory allocated by tensors; on CPU the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int = 20, warmup: int = 3) -> float:
    """Median time of `fn()` in ms over `repeats` calls after `warmup` uncounted ones, each between
    two device synchronizations, under inference mode (how latency is timed for NAS and the bench)."""
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3
