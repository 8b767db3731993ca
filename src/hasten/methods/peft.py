"""Parameter-efficient fine-tuning: LoRA, DoRA and QLoRA adapters through the `peft` library.

    model = apply(model, cfg.peft)      # base frozen, adapters on the target linears trainable
    merge(model)                        # fold the adapters into the base weights, in place

Adapters go on hasten's linears by name (wq wk wv wo of attention, w1 w2 w3 of SwiGLU), with
`peft.inject_adapter_in_model`, so the model stays a hasten Decoder (same forward, same
checkpoints, generation and export) with `peft`'s LoRA layers in place of the targeted nn.Linear.
Only adapter weights (lora_A, lora_B and, for DoRA, the magnitude vector) require gradients;
the optimizer sees nothing else.

QLoRA stores the frozen base linears in 4-bit NormalFloat (bitsandbytes `Linear4bit`), which
runs on CUDA only; on a CPU `apply` refuses with a ConfigError.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from hasten.config import ConfigError, PeftConfig

ADAPTER_MARKERS = ("lora_A", "lora_B", "lora_magnitude_vector", "lora_embedding")


def lora_config(cfg: PeftConfig):
    """The `peft.LoraConfig` of a hasten PeftConfig."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_names(),
                      use_dora=cfg.method == "dora", bias="none")


def _require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ConfigError("peft.method needs the `peft` package: pip install 'hasten[peft]'.") from None


def _quantize_nf4(model: nn.Module, names: list[str], device: torch.device) -> None:
    """Replace each target nn.Linear by a bitsandbytes NF4 Linear4bit holding the same weights."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError("peft.method=qlora needs bitsandbytes for its NF4 base weights: pip install bitsandbytes.") from None
    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in names and type(child) is nn.Linear:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute, quant_type="nf4", device="cpu")
                q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data.to("cpu"), requires_grad=False)
                setattr(parent, child_name, q.to(device))  # the move to CUDA quantizes


@functools.cache  # once per process
def _let_compile_trace_dora() -> None:
    """Let torch.compile trace DoRA's base weight.

    peft's DoRA reads its base weight through `peft.utils.integrations.dequantize_module_weight`,
    whose test for torchao weights (a string test on the weight's class) Dynamo cannot trace:
    each DoRA linear then broke the compiled graph, and the frames resumed after each break
    recompiled for every weight shape, so a compiled DoRA step ran slower than an eager one. For
    a weight that is a plain nn.Parameter or tensor that function returns the weight itself; this tells
    Dynamo so (`torch.compiler.substitute_in_graph`, used while tracing only). Any other weight
    (HQQ, torchao, bitsandbytes) still goes through peft's own function, run outside the graph."""
    from peft.utils import integrations

    original = integrations.dequantize_module_weight
    run_eagerly = torch.compiler.disable(original)

    def dequantize_module_weight(module: nn.Module) -> torch.Tensor:
        if type(module.weight) in (nn.Parameter, torch.Tensor) and not hasattr(module, "W_q"):  # (FSDP2 unsharded)
            return module.weight
        return run_eagerly(module)

    try:
        torch.compiler.substitute_in_graph(original)(dequantize_module_weight)
    except (TypeError, ValueError) as err:  # a peft whose function takes other arguments: DoRA works, slower
        warnings.warn(f"DoRA under torch.compile will break the graph at each adapted linear ({err})", stacklevel=2)


def _dora_output(base: torch.Tensor, lora: torch.Tensor, c: torch.Tensor, s: float) -> torch.Tensor:
    """DoRA's output beside its base linear's, (c - 1) * base + c * s * lora, keeping one 16-bit tensor
    of the output's size for backward where autograd over that expression keeps two (base and lora).

    c is the magnitude over the detached weight norm, one value per output feature. As
    c * (base + s * lora) - base, the gradients need c and base + s * lora alone; the sum is formed
    in fp32 for the output (c - 1 is small: rounding the sum to 16 bits first would swamp it) and
    kept in 16 bits only for the magnitude's gradient, through a term that adds zero in the forward.
    Plain autograd operations, no custom autograd.Function (torch.compile in PyTorch 2.11 misroutes
    the gradients of some of those: pytorch/pytorch#180642)."""
    base32 = base.float()
    combined = base32 + s * lora.float()
    kept = combined.detach().to(base.dtype)
    frozen = c.detach()
    return frozen * combined - base32 + (c - frozen) * kept


@functools.cache  # one class per process
def _lean_dora_layer_class() -> type:
    """peft's DoraLinearLayer with its output through `_dora_output` (same values, less kept for backward)."""
    from peft.tuners.lora.dora import DoraLinearLayer
    from peft.utils.integrations import dequantize_module_weight

    class LeanDoraLinearLayer(DoraLinearLayer):
        def forward(self, x, *, lora_A, lora_B, scaling, base_layer, base_result=None, adapter_name="default"):
            # peft's DoraLinearLayer.forward up to its last line (hasten adapts nn.Linear: no fan-in-fan-out)
            lora_weight = self.get_lora_weight(lora_A=lora_A, lora_B=lora_B, adapter_name=adapter_name).to(x.dtype)
            weight = dequantize_module_weight(base_layer).to(x.dtype)
            norm = self.get_weight_norm(weight=weight, lora_weight=lora_weight.detach(), scaling=scaling,
                                        adapter_name=adapter_name).detach()  # a constant, as in the DoRA paper
            if base_result is None:  # dropout on the adapter's input: the base output of that input
                base_result = nn.functional.linear(x, weight)
            elif base_layer.bias is not None:
                base_result = base_result - base_layer.bias
            return _dora_output(base_result, lora_B(lora_A(x)), (self.weight / norm).view(1, -1), scaling)

    return LeanDoraLinearLayer


def _lean_dora(model: nn.Module) -> int:
    """Swap each DoRA magnitude layer's class for the lean one (state and names unchanged); returns how many."""
    from peft.tuners.lora.dora import DoraLinearLayer

    lean = _lean_dora_layer_class()
    layers = [m for m in model.modules() if type(m) is DoraLinearLayer]
    for layer in layers:
        layer.__class__ = lean
    return len(layers)


def apply(model: nn.Module, cfg: PeftConfig) -> nn.Module:
    """Freeze `model` and add adapters to its target linears (in place; returns it). method=none is a no-op."""
    if cfg.method == "none":
        return model
    _require_peft()
    from peft import inject_adapter_in_model

    names = cfg.target_names()
    found = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [n for n in names if n not in found]
    if len(missing) == len(names):
        raise ConfigError(f"peft.targets={cfg.targets!r} names no linear of this model (it has "
                          f"{', '.join(sorted(found)) or 'none'}).")
    device = next(model.parameters()).device
    if cfg.method == "qlora":
        if device.type != "cuda":
            raise ConfigError("peft.method=qlora needs a CUDA GPU (its NF4 base weights run through bitsandbytes); "
                              "use peft.method=lora on this device.")
        _quantize_nf4(model, names, device)
    if cfg.method == "dora":
        _let_compile_trace_dora()
    for param in model.parameters():
        param.requires_grad_(False)
    model = inject_adapter_in_model(lora_config(cfg), model, adapter_name="default")
    if cfg.method == "dora" and cfg.dora_lean:
        _lean_dora(model)
    for name, param in model.named_parameters():
        param.requires_grad_(any(marker in name for marker in ADAPTER_MARKERS))
    model.to(device)
    return model


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen floating-point weights in `dtype` (bf16/fp16 runs); returns the bytes saved.

    Frozen weights need no fp32 master copy: nothing updates them, and autocast would cast them to
    the compute dtype at every forward anyway. Halving them halves the base's memory and removes
    those casts; the adapters stay fp32 (the optimizer updates them), and autocast runs their
    matmuls in `dtype`."""
    saved = 0
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            saved += param.numel() * (param.element_size() - torch.empty((), dtype=dtype).element_size())
            param.data = param.data.to(dtype)
    return saved


def keep_adapter_input_dtype(model: nn.Module) -> int:
    """Let LoRA adapters take their input in the compute dtype (bf16/fp16 runs under autocast);
    returns how many adapted layers changed.

    peft casts each adapter's input to the adapter weights' dtype (fp32 here) and autocast casts it
    straight back to 16 bits for the matmul: two copies of every adapted linear's input per
    forward, and the compiled step keeps the 16-bit copy for the adapter's weight gradient besides
    the input it was made from. Without the cast the adapter multiplies the 16-bit input itself:
    the same values, and on an H200 the peak of a compiled 1.1B LoRA step fell from 24.8 to
    23.5 GiB (benchmarks/results/peft.json)."""
    changed = 0
    for module in model.modules():  # DoRA's forward computes in its input's dtype: it keeps the cast
        if getattr(module, "cast_input_dtype_enabled", False) and not getattr(module, "lora_variant", None):
            module.cast_input_dtype_enabled = False
            changed += 1
    return changed


def is_peft(model: nn.Module) -> bool:
    """Whether the model holds peft adapter layers."""
    from importlib.util import find_spec

    if find_spec("peft") is None:
        return False
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in model.modules())


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base linear and put the plain linear back (in place; returns it).

    Uses peft's own merge (LoRA: W + s*B@A; DoRA: m * (W + s*B@A) / ||W + s*B@A||, row-wise)."""
    from peft.tuners.lora import LoraLayer

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                child.merge(safe_merge=True)
                base = child.get_base_layer()
                if type(base) is not nn.Linear:
                    raise ConfigError("Merging a QLoRA model needs its base in full precision; dequantize first.")
                base.weight.requires_grad_(True)
                setattr(parent, child_name, base)
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, tied weights once."""
    params = list(model.parameters())  # parameters() yields a shared tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


