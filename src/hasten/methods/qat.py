"""Quantization-aware training: fake-quantized linears during training, a real quantized model after.

Through torchao (`QATConfig`, `quantize_`). `prepare` swaps each eligible `nn.Linear` for torchao's
`FakeQuantizedLinear`: the forward rounds weights (and, for `int8da-int4w`, activations) to the
target grid and back, so the loss sees the quantization error, while gradients pass through the
rounding unchanged (straight-through estimator) and the weights stay float. The parameters keep
their names: checkpoints, resume and float exports are unchanged. `convert` then replaces the
weights by quantized tensors under the same base config, whose forward equals the fake-quantized
one. Post-training quantization (the baseline QAT is measured against) is `convert` applied to a
model trained in float.

Schemes (symmetric, per group of `group_size` input channels along each weight row):

- `int8da-int4w`: int8 per-token dynamic activations, int4 weights (torchao's and torchtune's QAT
  recipe for Llama-style models; ExecuTorch's CPU kernels run it);
- `int4w`: int4 weights, float activations;
- `int8da-int8w`: int8 per-token dynamic activations, int8 weights (W8A8);
- `int8w`: int8 weights, float activations (half the bf16 weight bytes, close to lossless).

Quantized: every `nn.Linear` of the decoder blocks but MoE routers. Not quantized: the token
embedding and the output head (tied to it by default), as in the usual int4 recipes; MoE experts'
stacked weights (not `nn.Linear`) stay float too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from hasten.config import ConfigError, QatConfig, load_config

SCHEMES = ("int8da-int4w", "int4w", "int8da-int8w", "int8w")
QUANTIZED_FILE = "quantized.pt"


def base_config(cfg: QatConfig) -> Any:
    """torchao's quantization config of `cfg.scheme`: what `convert` applies and `prepare` imitates."""
    try:
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerAxis, PerGroup
    except ImportError as err:
        raise ConfigError(f"qat.scheme={cfg.scheme} needs torchao (pip install torchao): {err}") from None
    if cfg.scheme not in SCHEMES:
        raise ConfigError(f"qat.scheme={cfg.scheme!r} is not one of {', '.join(SCHEMES)}.")
    granularity = PerGroup(cfg.group_size) if cfg.group_size else PerAxis(0)  # 0: one scale per output row
    weight_dtype = torch.int4 if cfg.scheme.endswith("int4w") else torch.int8
    if cfg.scheme.startswith("int8da-"):  # int8 activations, quantized per token at each forward
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=weight_dtype, weight_granularity=granularity)
    return IntxWeightOnlyConfig(weight_dtype=weight_dtype, granularity=granularity)


def quantized_linears(model: nn.Module, group_size: int) -> list[str]:
    """Names of the linears a scheme quantizes: every nn.Linear but the output head and MoE routers
    (whose few logits pick the experts); refuses a model where one's input width does not divide
    into groups."""
    from hasten.optim.muon import output_head

    head = output_head(model)
    names, odd = [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head and not name.endswith("router"):
            (names if not group_size or module.in_features % group_size == 0 else odd).append(name)
    if odd:
        raise ConfigError(f"qat.group_size={group_size} does not divide the input width of {', '.join(odd[:3])}"
                          f"{' ...' if len(odd) > 3 else ''}; choose a divisor (32 and 64 divide hasten's presets).")
    return names


def _filter(names: list[str]) -> Any:
    chosen = set(names)
    return lambda module, fqn: fqn in chosen


def prepare(model: nn.Module, cfg: QatConfig) -> nn.Module:
    """Fake-quantize the model's block linears in place (for training); returns the model."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    names = quantized_linears(model, cfg.group_size)
    quantize_(model, QATConfig(base_config(cfg), step="prepare"), filter_fn=_filter(names))
    return model


def convert(model: nn.Module, cfg: QatConfig) -> nn.Module:
    """Quantize the block linears in place: after `prepare`, QAT's convert step; on a model trained
    in float, post-training quantization. Returns the model, ready for inference."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    names = quantized_linears(model, cfg.group_size)
    prepared = any(type(m).__name__ == "FakeQuantizedLinear" for m in model.modules())
    quantize_(model, QATConfig(base_config(cfg), step="convert") if prepared else base_config(cfg),
              filter_fn=_filter(names))
    return model


def save_quantized(model: nn.Module, folder: Path) -> Path:
    """The quantized state dict (torchao tensors; torch.save, as safetensors holds plain tensors only)."""
    path = Path(folder) / QUANTIZED_FILE
    torch.save(model.state_dict(), path)
    return path


def load_quantized(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """(quantized model in eval mode, tokenizer) from a run folder that trained with `qat.scheme`."""
    from hasten.train.export import load_trained

    run_dir = Path(run_dir)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        # The quantized tensors loaded to "cuda" must land where the converted model's are, "cuda:N":
        # load_state_dict(assign=True) refuses to swap storages across the two spellings.
        device = torch.device("cuda", torch.cuda.current_device())
    path = run_dir / QUANTIZED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the run did not finish with qat.scheme set.")
    model, tokenizer, _ = load_trained(run_dir, device)
    convert(model, load_config(run_dir / "config.toml").qat)  # the quantized tensors' layout, then their values
    tied = _tied_names(model)
    model.load_state_dict(torch.load(path, map_location=device, weights_only=False), assign=True)
    for first, *others in tied:  # assign=True gives each name its own tensor: tie them again (embedding, head)
        for name in others:
            module, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module), attr, model.get_parameter(first))
    return model.eval(), tokenizer


def _tied_names(model: nn.Module) -> list[list[str]]:
    """Groups of parameter names that share one tensor."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]
