"""Fast paths of model ops, each next to a plain-PyTorch `_ref` twin with the same signature."""

from hasten.models.ops.grouped_gemm import (GROUP_ALIGN, expert_swiglu, expert_swiglu_ref,
                                            grouped_mm_available)

__all__ = ["GROUP_ALIGN", "expert_swiglu", "expert_swiglu_ref", "grouped_mm_available"]
