"""Gradient-based, latency-aware architecture search (docs/nas.md): a supernet whose layers mix
candidate mixers, a latency table measured on the device, and first-order DARTS."""

from hasten.nas.latency import latency_table, measure_ms
from hasten.nas.search import search
from hasten.nas.supernet import MixedOp, build_supernet, derive, expected_latency

__all__ = ["MixedOp", "build_supernet", "derive", "expected_latency", "latency_table", "measure_ms",
           "search"]
