"""The rows of `hasten bench`: one named set of config overrides per method (or combination).

A row is data: a name, the method family it belongs to, what that family is for (`benefit`) and
the `section.field=value` overrides that switch it on over the bench's common settings. Each
method family registers its rows here, one `register(Row(...))` line each; the registry rejects
duplicate names so that two families cannot silently shadow each other.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from hasten.config import ConfigError

# What a family can be for; a row's benefit is one of these or several joined by " + ".
BENEFITS = ("reference", "training time", "inference time", "memory", "quality", "quality at equal budget")


@dataclass(frozen=True, kw_only=True)
class Row:
    """One bench row: a method (or combination) as overrides of the common bench settings."""

    name: str
    family: str
    benefit: str
    overrides: tuple[str, ...]
    description: str
    distributed: bool = False  # runs under torchrun on the bench's --nproc-per-node processes

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/\\ ,:") or self.name.startswith("."):
            raise ConfigError(f"Bench row name {self.name!r} must be non-empty without '/', '\\', ' ', ',' or ':'.")
        for part in self.benefit.split(" + "):
            if part not in BENEFITS:
                raise ConfigError(f"Bench row {self.name!r} has benefit {part!r}; use one of {', '.join(BENEFITS)}.")
        for override in self.overrides:
            if "=" not in override:
                raise ConfigError(f"Bench row {self.name!r} override {override!r} is not section.field=value.")


ROWS: dict[str, Row] = {}


def register(row: Row) -> Row:
    """Add a row to the registry; a second row of the same name is an error, not a replacement."""
    if row.name in ROWS:
        raise ConfigError(f"A bench row named {row.name!r} is already registered ({ROWS[row.name].family}); "
                          "pick another name.")
    ROWS[row.name] = row
    return row


def _join_unique(parts: list[str]) -> str:
    return " + ".join(dict.fromkeys(p for part in parts for p in part.split(" + ") if p != "reference")) or "reference"


def combine(*names: str) -> Row:
    """A row that switches on several registered rows at once, e.g. combine('bf16', 'compile').

    Two rows that set the same key to different values cannot be combined: the result would
    depend on their order, so this raises instead.
    """
    rows = [get_row(name) for name in names]
    values: dict[str, str] = {}
    for row in rows:
        for override in row.overrides:
            key, value = override.split("=", 1)
            if values.get(key, value) != value:
                raise ConfigError(f"Bench rows {' and '.join(names)} set {key} to different values; "
                                  "they cannot be combined.")
            values[key] = value
    return Row(name="+".join(names), family=_join_unique([r.family for r in rows]),
               benefit=_join_unique([r.benefit for r in rows]),
               overrides=tuple(f"{k}={v}" for k, v in values.items()),
               description="; ".join(r.description for r in rows), distributed=any(r.distributed for r in rows))


def get_row(name: str) -> Row:
    """A registered row, or a combination 'a+b' of registered rows, by name."""
    if name in ROWS:
        return ROWS[name]
    if "+" in name and all(part in ROWS for part in name.split("+")):
        return combine(*name.split("+"))
    close = difflib.get_close_matches(name, list(ROWS), n=1)
    hint = f" Did you mean {close[0]}?" if close else ""
    raise ConfigError(f"Unknown bench row {name!r}.{hint} Known rows: {', '.join(ROWS)} (join names with '+' "
                      "to combine them).")


def default_row_names(device_type: str, nproc: int = 1) -> list[str]:
    """The rows `hasten bench` runs when none are named.

    On CPU fp16 autocast is slow and fp32 is already the baseline's precision; on a GPU the
    baseline is bf16, so fp32 and fp16 are the informative precision rows there.
    """
    several = ["ddp", "zero2", "zero3"] if nproc > 1 else []  # the distributed rows need several processes
    if device_type == "cuda":
        return ["baseline", "fp32", "fp16", "fp8", "compile", "wsd", "bf16+compile", "sophia", "muon", "moe-alt", "hybrid",
                "lora", *several]
    return ["baseline", "bf16", "compile", "wsd", "sophia", "muon", "moe", "lora", *several]


def parse_custom_row(spec: str) -> Row:
    """A one-off row from the command line: 'NAME:key=value key=value'."""
    name, sep, rest = spec.partition(":")
    if not sep or not rest.strip():
        raise ConfigError(f"--row {spec!r} must look like NAME:section.field=value [section.field=value ...].")
    return Row(name=name.strip(), family="custom", benefit="reference", overrides=tuple(rest.split()),
               description=f"custom row from the command line: {rest.strip()}")


# The rows of the methods that exist today. Later method families add one line each.
register(Row(name="baseline", family="baseline", benefit="reference", overrides=("precision.dtype=auto",),
             description="the recipe as it is (its optimizer, compiled if it compiles), "
                         "fp32 on CPU / bf16 on GPUs that support it"))
register(Row(name="fp32", family="mixed precision", benefit="reference", overrides=("precision.dtype=fp32",),
             description="full fp32 forward/backward (what mixed precision is measured against on a GPU)"))
register(Row(name="bf16", family="mixed precision", benefit="training time", overrides=("precision.dtype=bf16",),
             description="bf16 autocast, fp32 weights and optimizer"))
register(Row(name="bf16-residual", family="mixed precision", benefit="training time + memory",
             overrides=("precision.dtype=bf16", "model.fp32_residual=false"),
             description="bf16 autocast with the residual stream kept in bf16 too (Megatron-LM's default)"))
register(Row(name="split-residual", family="mixed precision", benefit="training time",
             overrides=("precision.dtype=bf16", "model.split_residual=true"),
             description="bf16 autocast with the fp32 residual stream stored as a bf16 pair: ~16-bit sums "
                         "forward, a bf16 gradient of the stream backward"))
register(Row(name="fp8", family="mixed precision", benefit="training time", overrides=("precision.fp8=rowwise",),
             description="the block linears' matmuls in fp8 with per-row dynamic scales (torchao.float8), over "
                         "the baseline's autocast; sm89+ GPUs (on a CPU it runs, slowly, for testing)"))
register(Row(name="fp16", family="mixed precision", benefit="training time", overrides=("precision.dtype=fp16",),
             description="fp16 autocast with dynamic loss scaling"))
register(Row(name="compile", family="compilation", benefit="training time", overrides=("train.compile=true",),
             description="forward and loss compiled as one graph with torch.compile"))
register(Row(name="wsd", family="schedule", benefit="quality at equal budget", overrides=("optim.schedule=wsd",),
             description="warmup-stable-decay learning-rate schedule instead of cosine"))
register(combine("bf16", "compile"))
register(Row(name="sophia", family="optimizers", benefit="training time", overrides=("optim.name=sophia",),
             description="SophiaG: clipped Newton-like steps from a Gauss-Newton-Bartlett Hessian refreshed every k steps"))
register(Row(name="muon", family="optimizers", benefit="training time", overrides=("optim.name=muon",),
             description="Muon (orthogonalized momentum) on hidden matrices, AdamW on the rest"))
register(Row(name="lion", family="optimizers", benefit="memory", overrides=("optim.name=lion", "optim.lr=3e-4"),
             description="Lion: sign of interpolated momentum, one state tensor (lr 3e-4, as its authors advise 3-10x "
                         "below AdamW's)"))
register(Row(name="adafactor", family="optimizers", benefit="memory", overrides=("optim.name=adafactor",),
             description="Adafactor: factored second moments"))
register(Row(name="schedulefree", family="optimizers", benefit="quality at equal budget",
             overrides=("optim.name=schedulefree_adamw",), description="schedule-free AdamW: no decay phase to plan"))
register(Row(name="adamw8bit", family="optimizers", benefit="memory", overrides=("optim.name=adamw8bit",),
             description="AdamW with 8-bit optimizer states (torchao)"))
register(Row(name="lora", family="PEFT", benefit="memory", overrides=("model.from={baseline}", "peft.method=lora"),
             description="LoRA (rank 8, attention and MLP) fine-tuning the trained baseline for the same budget"))
register(Row(name="dora", family="PEFT", benefit="memory", overrides=("model.from={baseline}", "peft.method=dora"),
             description="DoRA (LoRA plus a learned per-row magnitude) fine-tuning the trained baseline"))
register(Row(name="dora-peft", family="PEFT", benefit="memory",
             overrides=("model.from={baseline}", "peft.method=dora", "peft.dora_lean=false"),
             description="DoRA through peft's own layer, for the memory the default lean DoRA saves"))
register(Row(name="qlora", family="PEFT", benefit="memory", overrides=("model.from={baseline}", "peft.method=qlora"),
             description="LoRA on the trained baseline held in 4-bit NF4 (bitsandbytes; CUDA only)"))
register(Row(name="distill", family="distillation", benefit="inference time",
             overrides=("distill.teacher={baseline}", "model.n_layers={half_layers}", "train.loss_chunk=0"),
             description="a student of half the baseline's layers trained on the trained baseline's softened "
                         "predictions (distill.alpha 0.5, temperature 2) for the same budget"))
register(Row(name="qat", family="quantization", benefit="inference time + memory", overrides=("qat.scheme=int8da-int4w",),
             description="int8 dynamic activations and int4 weights (groups of 32) fake-quantized in the block "
                         "linears while training, converted after: loss, inference and bytes of the quantized model"))
register(Row(name="ptq", family="quantization", benefit="inference time + memory",
             overrides=("qat.scheme=int8da-int4w", "qat.fake_quant=false"),
             description="the same quantization applied after training in float (post-training quantization, "
                         "what QAT is measured against): loss, inference and bytes of the quantized model"))
register(Row(name="ptq-int8", family="quantization", benefit="memory",
             overrides=("qat.scheme=int8w", "qat.group_size=0", "qat.fake_quant=false"),
             description="int8 weights (one scale per row) applied after training in float: the near-lossless "
                         "option, against int4's smaller error budget"))
register(Row(name="ac", family="activation checkpointing", benefit="memory",
             overrides=("parallel.activation_checkpointing=full",),
             description="every block recomputes its activations in the backward pass"))
register(Row(name="ac-ops", family="activation checkpointing", benefit="memory",
             overrides=("parallel.activation_checkpointing=ops",),
             description="every block keeps only its matmul and attention outputs (compiled: attention outputs "
                         "and 16-bit sums), recomputing the rest"))
register(Row(name="ac-budget", family="activation checkpointing", benefit="memory",
             overrides=("train.compile=true", "parallel.activation_checkpointing=budget",
                        "parallel.activation_memory_budget=0.5"),
             description="compiled, the compiler recomputing the cheapest values to keep half its activations"))
register(Row(name="ddp", family="distributed", benefit="training time", overrides=("parallel.strategy=ddp",),
             description="DistributedDataParallel over the bench's processes (global batch grows with them)",
             distributed=True))
register(Row(name="zero2", family="distributed", benefit="memory", overrides=("parallel.strategy=zero2",),
             description="FSDP2 sharding gradients and optimizer states (ZeRO-2)", distributed=True))
register(Row(name="zero3", family="distributed", benefit="memory", overrides=("parallel.strategy=zero3",),
             description="FSDP2 sharding parameters too (ZeRO-3)", distributed=True))
register(Row(name="moe", family="architectures", benefit="quality at equal budget", overrides=("model.ffns=E",),
             description="every FFN a mixture of 8 experts, top-2, about the dense FFN's active parameters"))
register(Row(name="moe-alt", family="architectures", benefit="quality at equal budget", overrides=("model.ffns=DE",),
             description="every other FFN a mixture of 8 experts (the moe-gpu recipe's layout), top-2"))
register(Row(name="moe-shared", family="architectures", benefit="quality at equal budget",
             overrides=("model.ffns=E", "model.moe_shared_expert=true"),
             description="moe plus one shared expert every token uses (DeepSeekMoE), active parameters matched"))
register(Row(name="mamba", family="architectures", benefit="training time", overrides=("model.mixers=M",),
             description="every sequence mixer a Mamba-2 (SSD) layer instead of attention"))
register(Row(name="hybrid", family="architectures", benefit="training time", overrides=("model.mixers=MA",),
             description="Mamba-2 and attention layers alternating"))
register(Row(name="mamba-recompute", family="architectures", benefit="memory",
             overrides=("model.mixers=M", "model.ssm_recompute=true"),
             description="every mixer Mamba-2, its conv and SSD scan rerun in backward from its in-projection"))
