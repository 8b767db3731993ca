"""The run configuration: one frozen-by-convention dataclass per component.

A run is described by a `RunConfig` tree. It is loaded from a TOML recipe, then overridden by
dotted `section.field=value` arguments, then validated. Every field carries its help text and,
where the values are a closed set, its choices, so that `hasten train --help` and the error
messages are generated from the same place as the defaults.

Config is data: no modules, devices or tokenizers live here; builders receive them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import importlib.resources
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A user mistake in a recipe or an override; the message is one sentence naming the fix."""


def _f(default: Any, help: str, *, choices: tuple[Any, ...] | None = None) -> Any:
    """A dataclass field with its help text and, optionally, its allowed values."""
    return field(default=default, metadata={"help": help, "choices": choices})


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}.")


# Letters of the per-layer patterns in ModelConfig (the decoder maps each to a layer factory).
MIXER_LETTERS = "AM"  # attention, Mamba-2
FFN_LETTERS = "DE"  # dense SwiGLU, mixture of experts


def _repeat(pattern: str, n_layers: int) -> str:
    """A per-layer pattern stretched to n_layers by repetition ('MA' over 4 layers is 'MAMA')."""
    return pattern * (n_layers // len(pattern)) if n_layers % len(pattern) == 0 else pattern


# Model fields that say how a run computes, not what the weights are: a run from pretrained weights
# (model.from) keeps its own values of these and takes the rest from the source.
RUN_MODEL_FIELDS = ("dropout", "fp32_residual", "split_residual", "fuse_projections", "fuse_norms")


@dataclass(kw_only=True)
class ModelConfig:
    """Llama-style decoder shape. `preset` fills the shape; fields given explicitly win."""

    preset: str = _f("", "named shape to start from (tiny, small, gpt2-124m, 350m, 1b); empty = use the fields below")
    from_path: str = _f("", "start from pretrained weights (also spelled model.from): a Hugging Face Llama, "
                            "Mistral or Qwen2 folder, or a hasten run, checkpoint or export; its shape replaces the fields below "
                            "(but for dropout and the residual precision: how this run computes) and its "
                            "tokenizer replaces data.tokenizer (docs/peft.md)")
    dim: int = _f(256, "model width d_model")
    n_layers: int = _f(4, "number of decoder blocks")
    n_heads: int = _f(4, "attention heads")
    n_kv_heads: int = _f(0, "key/value heads for grouped-query attention; 0 = n_heads")
    ffn_dim: int = _f(0, "SwiGLU hidden width; 0 = 8/3 * dim rounded up to ffn_multiple_of")
    ffn_multiple_of: int = _f(64, "round the automatic ffn_dim up to a multiple of this")
    vocab_size: int = _f(0, "embedding rows; 0 = the tokenizer's vocabulary rounded up to a multiple of 64")
    max_seq_len: int = _f(256, "longest sequence the RoPE tables cover")
    rope_theta: float = _f(10000.0, "RoPE base frequency")
    norm_eps: float = _f(1e-5, "RMSNorm epsilon")
    tie_embeddings: bool = _f(True, "share the input embedding with the output head")
    dropout: float = _f(0.0, "dropout on attention and residual branches")
    fp32_residual: bool = _f(True, "under bf16/fp16 autocast, keep the residual stream in fp32; false keeps it in the "
                                   "autocast dtype (half the bytes of the saved residuals and of the element-wise "
                                   "work on them; Megatron-LM's default)")
    split_residual: bool = _f(False, "with the fp32 stream under bf16 autocast, store it as two bf16 tensors, its bf16 "
                                     "rounding and the remainder: sums keep ~16 bits of mantissa, and backward's "
                                     "gradient of the stream is bf16 (half the bytes)")
    qkv_bias: bool = _f(False, "biases on the attention q/k/v projections (Qwen2 checkpoints)")
    fuse_projections: bool = _f(False, "on a GPU with Triton: attention's q, k, v as one matmul over their weights "
                                       "concatenated at each forward, RoPE and the split in one kernel after it; the "
                                       "SwiGLU's gate and up likewise, silu(gate) * up in one kernel (parameters and "
                                       "checkpoints unchanged; layers wrapped by an adapter or a quantizer, cached "
                                       "generation and packed sequences keep the unfused path; no effect on the CPU)")
    fuse_norms: bool = _f(False, "with the split stream (model.split_residual under bf16), on a GPU with Triton: each "
                                 "residual sum, its split into the bf16 pair and the next RMSNorm as one kernel each "
                                 "way (no fp32 sum kept for backward, the norm's weight gradient in the same pass); "
                                 "no effect without the split stream, with dropout while training, or on the CPU")
    init_std: float = _f(0.02, "std of the normal init; output projections are scaled by 1/sqrt(2*n_layers)")
    mixers: str = _f("", "sequence mixer of each layer, one letter per layer: A attention, M Mamba-2 (e.g. 'MMAM'); "
                         "a shorter pattern whose length divides n_layers repeats ('M' = all Mamba-2); empty = all A")
    ffns: str = _f("", "feed-forward of each layer, one letter per layer: D dense SwiGLU, E mixture of experts; "
                       "a shorter pattern whose length divides n_layers repeats ('E' = all MoE); empty = all D")
    num_experts: int = _f(8, "experts per MoE layer")
    top_k: int = _f(2, "experts each token is routed to")
    moe_router: str = _f("softmax", "router scores: softmax (Switch/Mixtral) or sigmoid (DeepSeek-V3)", choices=("softmax", "sigmoid"))
    moe_shared_expert: bool = _f(False, "add one always-on expert that every token passes through")
    moe_capacity_factor: float = _f(0.0, "expert capacity as a multiple of the balanced load; tokens over it are dropped (0 = dropless)")
    moe_aux_weight: float = _f(0.01, "weight of the load-balancing loss")
    moe_z_weight: float = _f(0.001, "weight of the router z-loss")
    moe_routed_scale: float = _f(1.0, "factor on the routed experts' weighted sum (DeepSeek's routed scaling factor)")
    moe_hidden_dim: int = _f(0, "hidden width of one expert; 0 = the dense width / (top_k + shared), so active params match dense")
    ssm_state: int = _f(64, "Mamba-2 state size N per head")
    ssm_head_dim: int = _f(64, "Mamba-2 head size P")
    ssm_expand: int = _f(2, "Mamba-2 inner width as a multiple of dim")
    ssm_chunk: int = _f(128, "Mamba-2 SSD chunk length")
    ssm_groups: int = _f(1, "Mamba-2 groups of heads sharing B and C")
    ssm_conv: int = _f(4, "Mamba-2 causal depthwise convolution width")
    ssm_recompute: bool = _f(False, "Mamba-2: keep only the in-projection's output for the conv and the SSD scan "
                                    "and run them again in backward (a compiled mixer kept 6.3 instead of 34.2 KiB "
                                    "a token, for one more forward of the scan; docs/architectures.md)")

    def layer_mixers(self) -> str:
        """The mixer letter of every layer (the `mixers` pattern, or all attention)."""
        return _repeat(self.mixers or "A", self.n_layers)

    def layer_ffns(self) -> str:
        """The feed-forward letter of every layer (the `ffns` pattern, or all dense)."""
        return _repeat(self.ffns or "D", self.n_layers)

    def _check_patterns(self) -> None:
        for name, letters in (("mixers", MIXER_LETTERS), ("ffns", FFN_LETTERS)):
            pattern = getattr(self, name)
            _check(not pattern or self.n_layers % len(pattern) == 0, f"model.{name}", pattern,
                   f"it needs one letter per layer, {self.n_layers} letters for model.n_layers={self.n_layers} "
                   "(or a shorter pattern whose length divides it, which repeats)")
            bad = sorted(set(pattern) - set(letters))
            _check(not bad, f"model.{name}", pattern, f"use only the letters {', '.join(letters)} (found {', '.join(bad)})")
        if "E" in self.layer_ffns():
            _check(self.num_experts > 0, "model.num_experts", self.num_experts, "it must be > 0")
            _check(0 < self.top_k <= self.num_experts, "model.top_k", self.top_k,
                   f"it must be in [1, model.num_experts={self.num_experts}]")
            _check(self.moe_capacity_factor >= 0, "model.moe_capacity_factor", self.moe_capacity_factor, "it must be >= 0")
            _check(self.moe_routed_scale > 0, "model.moe_routed_scale", self.moe_routed_scale, "it must be > 0")
            for name in ("moe_aux_weight", "moe_z_weight", "moe_hidden_dim"):
                _check(getattr(self, name) >= 0, f"model.{name}", getattr(self, name), "it must be >= 0")
        if "M" in self.layer_mixers():
            for name in ("ssm_state", "ssm_head_dim", "ssm_expand", "ssm_chunk", "ssm_groups", "ssm_conv"):
                _check(getattr(self, name) > 0, f"model.{name}", getattr(self, name), "it must be > 0")
            inner = self.ssm_expand * self.dim
            _check(inner % self.ssm_head_dim == 0, "model.ssm_head_dim", self.ssm_head_dim,
                   f"it must divide the inner width ssm_expand*dim={inner}")
            heads = inner // self.ssm_head_dim
            _check(heads % self.ssm_groups == 0, "model.ssm_groups", self.ssm_groups,
                   f"it must divide the {heads} Mamba-2 heads (ssm_expand*dim/ssm_head_dim)")

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "max_seq_len"):
            _check(getattr(self, name) > 0, f"model.{name}", getattr(self, name), "it must be > 0")
        self._check_patterns()
        kv = self.n_kv_heads or self.n_heads
        _check(self.dim % self.n_heads == 0, "model.n_heads", self.n_heads, f"model.dim={self.dim} must be divisible by it")
        _check(self.n_heads % kv == 0, "model.n_kv_heads", self.n_kv_heads, f"it must divide model.n_heads={self.n_heads}")
        _check((self.dim // self.n_heads) % 2 == 0, "model.n_heads", self.n_heads, "the head size dim/n_heads must be even for RoPE")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "it must be in [0, 1)")
        _check(self.init_std > 0, "model.init_std", self.init_std, "it must be > 0")


@dataclass(kw_only=True)
class DataConfig:
    """Where the text comes from and how it becomes tokens."""

    source: str = _f("stdlib", "'stdlib' (the Python standard library's .py files), a text/JSONL file, a folder, a glob, or 'hf:NAME' (needs `datasets`)")
    text_field: str = _f("text", "field holding the text in JSONL and Hugging Face datasets")
    hf_split: str = _f("train", "split of a Hugging Face dataset")
    val_fraction: float = _f(0.05, "fraction of documents (files) held out for validation, chosen by a hash of the name")
    max_documents: int = _f(0, "use at most this many documents (0 = all); the selection is deterministic")
    tokenizer: str = _f("bpe", "'byte', 'bpe' (trained on the train split with `tokenizers`, cached), or a folder holding tokenizer.json")
    bpe_vocab_size: int = _f(4096, "vocabulary size of a trained BPE tokenizer")
    cache_dir: str = _f("", "token cache folder; empty = $HASTEN_CACHE or ~/.cache/hasten")
    pack: str = _f("auto", "instruction data: on = several records per row, attention and positions restarting "
                           "at each record; off = one record per row, padded; auto = on when every layer is "
                           "attention (a Mamba-2 scan cannot be split by record)", choices=("auto", "on", "off"))

    def __post_init__(self) -> None:
        _check(0.0 < self.val_fraction < 1.0, "data.val_fraction", self.val_fraction, "it must be in (0, 1)")
        _check(self.max_documents >= 0, "data.max_documents", self.max_documents, "it must be >= 0")
        _check(258 <= self.bpe_vocab_size <= 2**32 - 1, "data.bpe_vocab_size", self.bpe_vocab_size, "it must be in [258, 2^32)")


@dataclass(kw_only=True)
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: str = _f("adamw", "optimizer (docs/optimizers.md says which to pick)",
                   choices=("adamw", "sophia", "lion", "muon", "adafactor", "schedulefree_adamw", "adamw8bit"))
    lr: float = _f(1e-3, "peak learning rate")
    weight_decay: float = _f(0.1, "decoupled weight decay (not applied to norms, biases and embeddings)")
    beta1: float = _f(0.9, "first-moment decay")
    beta2: float = _f(0.95, "second-moment decay")
    eps: float = _f(1e-8, "denominator epsilon")
    fused: str = _f("auto", "fused optimizer kernel: auto (on when on GPU), on, off", choices=("auto", "on", "off"))
    schedule: str = _f("cosine", "learning-rate schedule", choices=("cosine", "wsd", "constant"))
    horizon: str = _f("steps", "what the schedule's decay spans: steps (train.steps) or time (train.time_limit_s "
                               "of training in all: the rate reaches its end as the time runs out, for runs "
                               "compared at equal wall time; the warmup stays in steps)", choices=("steps", "time"))
    warmup_steps: int = _f(100, "linear warmup steps")
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of the peak (cosine, wsd)")
    decay_fraction: float = _f(0.2, "fraction of the run spent decaying in warmup-stable-decay")
    sophia_rho: float = _f(0.04, "sophia: clipping scale rho; the step is lr*clip(m / max(rho*h, eps), 1)")
    sophia_beta1: float = _f(0.965, "sophia: gradient-momentum decay")
    sophia_beta2: float = _f(0.99, "sophia: decay of the Hessian-diagonal moving average")
    sophia_hessian_every: int = _f(10, "sophia: refresh the Hessian estimate every this many steps (one extra "
                                       "forward/backward on labels sampled from the model)")
    sophia_bias_correction: bool = _f(False, "sophia: divide the Hessian average by 1 - beta2^refreshes, as Adam "
                                             "does its moments (not in the paper; for short runs)")
    lion_beta1: float = _f(0.9, "lion: interpolation between momentum and gradient for the sign")
    lion_beta2: float = _f(0.99, "lion: momentum decay")
    muon_momentum: float = _f(0.95, "muon: Nesterov momentum of the hidden matrices")
    muon_momentum_warmup: int = _f(0, "muon: raise the momentum linearly from muon_momentum_start to muon_momentum "
                                      "over this many steps (modded-nanogpt: 300); 0 keeps it fixed")
    muon_momentum_start: float = _f(0.85, "muon: the momentum at step 0 when muon_momentum_warmup > 0")
    muon_ns_steps: int = _f(5, "muon: Newton-Schulz iterations that orthogonalize each update")
    muon_adjust_lr: str = _f("match_rms_adamw", "muon: per-matrix lr scaling; match_rms_adamw lets muon share "
                                                "optim.lr with AdamW (Moonlight), original is Keller Jordan's",
                             choices=("match_rms_adamw", "original"))
    muon_lr_scale: float = _f(1.0, "muon: learning rate of the hidden matrices as a multiple of optim.lr")
    adafactor_beta2_decay: float = _f(-0.8, "adafactor: second-moment decay is 1 - step^this")
    adafactor_clip: float = _f(1.0, "adafactor: clip the update's RMS to this (d in the paper)")

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", self.lr, "it must be > 0")
        for name in ("sophia_beta1", "sophia_beta2", "lion_beta1", "lion_beta2", "muon_momentum", "muon_momentum_start"):
            _check(0.0 <= getattr(self, name) < 1.0, f"optim.{name}", getattr(self, name), "it must be in [0, 1)")
        for name in ("sophia_rho", "sophia_hessian_every", "muon_ns_steps", "muon_lr_scale", "adafactor_clip"):
            _check(getattr(self, name) > 0, f"optim.{name}", getattr(self, name), "it must be > 0")
        _check(self.muon_momentum_warmup >= 0, "optim.muon_momentum_warmup", self.muon_momentum_warmup, "it must be >= 0")
        _check(self.adafactor_beta2_decay <= 0, "optim.adafactor_beta2_decay", self.adafactor_beta2_decay,
               "it must be <= 0")
        _check(self.fused != "on" or self.name == "adamw", "optim.fused", self.fused,
               f"the fused kernel exists for adamw only, not optim.name={self.name}; use optim.fused=auto")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "it must be >= 0")
        for name in ("beta1", "beta2"):
            _check(0.0 <= getattr(self, name) < 1.0, f"optim.{name}", getattr(self, name), "it must be in [0, 1)")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "it must be >= 0")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio", self.min_lr_ratio, "it must be in [0, 1]")
        _check(0.0 < self.decay_fraction <= 1.0, "optim.decay_fraction", self.decay_fraction, "it must be in (0, 1]")


@dataclass(kw_only=True)
class PrecisionConfig:
    """Numeric precision of the forward/backward pass (weights and optimizer stay fp32)."""

    dtype: str = _f("auto", "autocast precision: auto = bf16 on GPUs that support it, else fp32", choices=("auto", "fp32", "bf16", "fp16"))
    fp8: str = _f("none", "fp8 matmuls in the block linears through torchao.float8 (dynamic scaling, forward and "
                          "backward), on top of dtype: tensorwise (one scale per tensor) or rowwise (per row, "
                          "more accurate); needs an sm89+ GPU (Ada, Hopper) or the CPU (for tests, slow)",
                  choices=("none", "tensorwise", "rowwise"))
    loss_scale_init: float = _f(2.0**16, "initial loss scale for fp16")
    loss_scale_growth_interval: int = _f(2000, "steps without overflow before the fp16 loss scale doubles")

    def __post_init__(self) -> None:
        _check(self.loss_scale_init > 0, "precision.loss_scale_init", self.loss_scale_init, "it must be > 0")
        _check(self.loss_scale_growth_interval > 0, "precision.loss_scale_growth_interval", self.loss_scale_growth_interval, "it must be > 0")


@dataclass(kw_only=True)
class TrainConfig:
    """The loop: how long, how big, where, and when to evaluate."""

    steps: int = _f(1000, "optimizer steps")
    batch_size: int = _f(16, "sequences per micro-batch")
    seq_len: int = _f(256, "tokens per sequence")
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 = no clipping)")
    eval_every: int = _f(200, "evaluate every this many steps (0 = only at the end)")
    eval_batches: int = _f(20, "validation micro-batches per evaluation (the same ones every time and for "
                                  "every train.seed, so runs of different seeds compare)")
    seed: int = _f(1337, "seed of initialization, sampling and dropout")
    device: str = _f("auto", "auto (cuda when present), cpu, cuda, cuda:N")
    compile: bool = _f(False, "compile with torch.compile (train.compile_scope says what: by default the forward "
                              "pass and loss as one graph)")
    compile_mode: str = _f("default", "torch.compile mode", choices=("default", "reduce-overhead", "max-autotune",
                                                                    "max-autotune-no-cudagraphs"))
    compile_scope: str = _f("model", "what train.compile compiles in a one-process run: model (the forward and "
                                     "loss as one graph, fused across blocks and into the loss) or blocks (each "
                                     "block of the model's `layers` alone, as distributed runs always do: blocks "
                                     "of one shape share one compiled graph, so compiling takes a fraction of the "
                                     "time; the embedding, head and loss run uncompiled)", choices=("model", "blocks"))
    loss_chunk: int = _f(0, "hasten's decoder: output head + cross-entropy this many tokens at a time, their "
                            "gradients made in forward, never the whole logits (saves two tokens x vocab "
                            "tensors; 0 = off); on CUDA one Triton kernel makes each chunk's loss and logits' gradient")
    loss_kernel: str = _f("auto", "what computes the train.loss_chunk path: auto = QuACK's fused linear cross-entropy "
                                  "on a Hopper GPU under bf16 when the quack-kernels package is installed (the head's "
                                  "GEMMs make loss and gradients without a pass over the logits), else triton on "
                                  "CUDA, else torch; quack = QuACK's (its package, a Hopper GPU and bf16 needed); "
                                  "triton = the head's matmuls around one Triton kernel; torch = compiled PyTorch "
                                  "operations", choices=("auto", "quack", "triton", "torch"))
    gemm_kernel: str = _f("cublas", "what computes the forward and input-gradient GEMMs of the fused layers "
                                    "(model.fuse_projections) under bf16 on CUDA: cublas = PyTorch's matmul; quack "
                                    "= QuACK's CuTe-DSL GEMM (the quack-kernels package and a Hopper GPU needed); "
                                    "auto = quack where it can run, else cublas. With quack the SwiGLU runs in the "
                                    "epilogues of QuACK's gated GEMMs; the weight gradients stay on cuBLAS (fp32 "
                                    "output)", choices=("auto", "quack", "cublas"))
    gemm_tune: bool = _f(True, "with QuACK's GEMM (train.gemm_kernel): autotune each shape on its first call (a few "
                               "seconds a shape, once a process; QUACK_CACHE_AUTOTUNING=1 keeps the choices on disk); "
                               "false = its default tile configuration")
    attention_backend: str = _f("auto", "scaled-dot-product attention kernel on GPU (auto = PyTorch's choice; fa4 = "
                                        "FlashAttention-4's CuTe kernels in place of PyTorch's flash kernel, on Hopper "
                                        "and Blackwell, from the flash-attn-4 package)",
                                choices=("auto", "flash", "cudnn", "efficient", "math", "fa4"))
    out_dir: str = _f("runs/default", "run folder: config, logs, checkpoints, plots, exported weights")
    resume: str = _f("none", "'none', 'auto' (newest complete checkpoint in the run folder), or a checkpoint folder")
    time_limit_s: float = _f(0.0, "stop (after saving) once training has run this many seconds after its first "
                                  "step, which holds compilation and warm-up, in this process; with "
                                  "optim.horizon=time, in all (a resumed run counts the seconds before it) "
                                  "(0 = no limit)")
    max_bad_steps: int = _f(5, "stop (after saving) when this many consecutive steps have a non-finite loss")
    threads: int = _f(0, "CPU threads for torch (0 = torch's default)")

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "max_bad_steps"):
            _check(getattr(self, name) > 0, f"train.{name}", getattr(self, name), "it must be > 0")
        _check(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "it must be >= 0")
        _check(self.eval_every >= 0, "train.eval_every", self.eval_every, "it must be >= 0")
        _check(self.loss_chunk >= 0, "train.loss_chunk", self.loss_chunk, "it must be >= 0 (0 = off)")
        _check(self.loss_kernel == "auto" or self.loss_chunk > 0, "train.loss_kernel", self.loss_kernel,
               "it chooses the kernel of the train.loss_chunk path, which is off: set train.loss_chunk > 0 too")
        _check(self.time_limit_s >= 0, "train.time_limit_s", self.time_limit_s, "it must be >= 0")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
               "train.device", self.device, "use auto, cpu, cuda or cuda:N")


@dataclass(kw_only=True)
class LogConfig:
    """What the run reports while it runs and at the end."""

    every: int = _f(10, "read the loss from the device and log every this many steps")
    progress: bool = _f(True, "show a progress bar (rank 0, interactive terminals)")
    tensorboard: bool = _f(True, "write TensorBoard events in the run folder")
    plot: bool = _f(True, "write loss.png at the end")
    sample_tokens: int = _f(200, "tokens generated at the end from sample_prompt (0 = none)")
    sample_prompt: str = _f("def ", "prompt of the end-of-run sample")

    def __post_init__(self) -> None:
        _check(self.every > 0, "log.every", self.every, "it must be > 0")
        _check(self.sample_tokens >= 0, "log.sample_tokens", self.sample_tokens, "it must be >= 0")


@dataclass(kw_only=True)
class CheckpointConfig:
    """Resumable checkpoints (torch.distributed.checkpoint) in <out_dir>/checkpoints."""

    every: int = _f(500, "save every this many steps (0 = only at the end)")
    keep: int = _f(2, "keep the newest this many checkpoints")
    at_end: bool = _f(True, "save when the run finishes")

    def __post_init__(self) -> None:
        _check(self.every >= 0, "checkpoint.every", self.every, "it must be >= 0")
        _check(self.keep > 0, "checkpoint.keep", self.keep, "it must be > 0")


@dataclass(kw_only=True)
class ParallelConfig:
    """Data parallelism over the ranks of a torchrun launch (docs/distributed.md)."""

    strategy: str = _f("none", "none (one process), ddp (replicate), zero1 (shard optimizer states), zero2 (also "
                               "gradients, FSDP2 without resharding), zero3 (also parameters, FSDP2)",
                       choices=("none", "ddp", "zero1", "zero2", "zero3"))
    cpu_offload: bool = _f(False, "keep sharded parameters, gradients and optimizer states in CPU memory (zero2, zero3)")
    activation_checkpointing: str = _f("none", "recompute block activations in the backward pass: full (whole "
                                               "blocks), ops (all but matmul and attention outputs), selective "
                                               "(full on every other block), or budget (torch.compile picks what "
                                               "to recompute to fit parallel.activation_memory_budget)",
                                       choices=("none", "full", "selective", "ops", "budget"))
    activation_checkpoint_fraction: float = _f(1.0, "activation_checkpointing=full or ops: the fraction of blocks "
                                                    "checkpointed, spread evenly (1.0 = every block)")
    activation_memory_budget: float = _f(0.5, "activation_checkpointing=budget: activation memory kept, as a "
                                              "fraction of what torch.compile saves by default (1.0 = its default, "
                                              "0.0 = recompute all it can)")

    def __post_init__(self) -> None:
        _check(0.0 <= self.activation_memory_budget <= 1.0, "parallel.activation_memory_budget",
               self.activation_memory_budget, "a fraction between 0.0 and 1.0")
        _check(0.0 < self.activation_checkpoint_fraction <= 1.0, "parallel.activation_checkpoint_fraction",
               self.activation_checkpoint_fraction, "a fraction above 0.0, at most 1.0")
        _check(not self.cpu_offload or self.strategy in ("zero2", "zero3"), "parallel.cpu_offload", self.cpu_offload,
               f"CPU offload needs parallel.strategy=zero2 or zero3, not {self.strategy}")


@dataclass(kw_only=True)
class PeftConfig:
    """Parameter-efficient fine-tuning: low-rank adapters on the decoder's linears (docs/peft.md)."""

    method: str = _f("none", "none (train every weight), lora, dora (weight-decomposed LoRA), qlora (LoRA on an "
                             "NF4-quantized base; CUDA only)", choices=("none", "lora", "dora", "qlora"))
    rank: int = _f(8, "adapter rank r")
    alpha: float = _f(16.0, "adapter scale numerator: the update is (alpha / rank) * B @ A")
    dropout: float = _f(0.0, "dropout on the adapter's input")
    targets: str = _f("all-linear", "linears that get adapters: attention (wq wk wv wo), mlp (w1 w2 w3), "
                                    "all-linear (both), or a comma list of names such as wq,wv")
    dora_lean: bool = _f(True, "DoRA: keep one tensor of each adapted linear's output size for backward instead "
                               "of peft's several (the same values and gradients, ~10 % less peak memory on a 1.1B "
                               "model; docs/peft.md); false runs peft's own layer. Other methods ignore it")

    def target_names(self) -> list[str]:
        groups = {"attention": ["wq", "wk", "wv", "wo"], "mlp": ["w1", "w2", "w3"],
                  "all-linear": ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]}
        if self.targets in groups:
            return groups[self.targets]
        return [name.strip() for name in self.targets.split(",") if name.strip()]

    def __post_init__(self) -> None:
        _check(self.rank > 0, "peft.rank", self.rank, "it must be > 0")
        _check(self.alpha > 0, "peft.alpha", self.alpha, "it must be > 0")
        _check(0.0 <= self.dropout < 1.0, "peft.dropout", self.dropout, "it must be in [0, 1)")
        known = {"wq", "wk", "wv", "wo", "w1", "w2", "w3"}
        names = self.target_names()
        _check(bool(names) and set(names) <= known, "peft.targets", self.targets,
               f"use attention, mlp, all-linear or a comma list of {', '.join(sorted(known))}")


@dataclass(kw_only=True)
class DistillConfig:
    """Knowledge distillation: a frozen teacher's soft predictions train this run's model (docs/distill.md)."""

    teacher: str = _f("", "the teacher: a hasten run, checkpoint or export folder, or a Hugging Face Llama-family "
                          "folder; its tokenizer becomes this run's (empty = no distillation)")
    alpha: float = _f(0.5, "weight of the distillation term: loss = (1 - alpha) * cross-entropy + alpha * "
                           "temperature^2 * KL(teacher || student), over the positions that have a target")
    temperature: float = _f(2.0, "softens both distributions before the KL (Hinton et al. 2015)")

    def __post_init__(self) -> None:
        _check(0.0 <= self.alpha <= 1.0, "distill.alpha", self.alpha, "it must be in [0, 1]")
        _check(self.temperature > 0, "distill.temperature", self.temperature, "it must be > 0")


@dataclass(kw_only=True)
class QatConfig:
    """Quantization-aware training through torchao: fake-quantized block linears while training, a
    quantized model after (docs/qat.md)."""

    scheme: str = _f("none", "none, or the target: int8da-int4w (int8 dynamic activations, int4 weights), int4w "
                             "(int4 weights), int8da-int8w (int8 activations and weights) or int8w (int8 weights); "
                             "the block linears are quantized, not the embedding and output head",
                     choices=("none", "int8da-int4w", "int4w", "int8da-int8w", "int8w"))
    group_size: int = _f(32, "input channels that share one weight scale; 0 = one scale per output channel (row)")
    fake_quant: bool = _f(True, "train with the quantization in the forward (QAT); false trains in float and "
                                "quantizes after (post-training quantization, the baseline QAT is measured against)")

    def __post_init__(self) -> None:
        _check(self.group_size >= 0, "qat.group_size", self.group_size, "it must be >= 0")


@dataclass(kw_only=True)
class NasConfig:
    """Gradient-based architecture search, latency-aware: each layer's mixer chosen among candidates
    (`hasten nas`, docs/nas.md)."""

    candidates: str = _f("AM", "mixer letters each layer chooses among (A attention, M Mamba-2)")
    ffn_candidates: str = _f("", "FFN letters each layer chooses among too (D dense SwiGLU, E mixture of experts, "
                                 "as model.moe_* set it); empty = the recipe's FFNs, not searched")
    steps: int = _f(300, "search steps; each trains the weights on one batch and the architecture on another")
    warmup_steps: int = _f(100, "steps that train the weights alone before the architecture starts to move")
    alpha_lr: float = _f(3e-3, "Adam learning rate of the architecture parameters (DARTS's)")
    latency_weight: float = _f(0.5, "lambda: the architecture loss is cross-entropy + lambda * expected latency / "
                                    "the latency of an all-first-candidates model")
    latency_batch: int = _f(1, "batch of the inference the latency table times")
    latency_seq_len: int = _f(0, "sequence length of that inference; 0 = train.seq_len")

    def __post_init__(self) -> None:
        for name in ("steps", "latency_batch"):
            _check(getattr(self, name) > 0, f"nas.{name}", getattr(self, name), "it must be > 0")
        _check(0 <= self.warmup_steps < self.steps, "nas.warmup_steps", self.warmup_steps,
               "it must be >= 0 and below nas.steps")
        _check(self.alpha_lr > 0, "nas.alpha_lr", self.alpha_lr, "it must be > 0")
        _check(self.latency_weight >= 0, "nas.latency_weight", self.latency_weight, "it must be >= 0")
        _check(self.latency_seq_len >= 0, "nas.latency_seq_len", self.latency_seq_len, "it must be >= 0")


def check_seq_len(config: RunConfig) -> None:
    """Training windows must fit the model's positions."""
    _check(config.train.seq_len <= config.model.max_seq_len, "train.seq_len", config.train.seq_len,
           f"it must be <= model.max_seq_len={config.model.max_seq_len}")


@dataclass(kw_only=True)
class RunConfig:
    """A whole run. Sections map one to one onto TOML tables."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    qat: QatConfig = field(default_factory=QatConfig)
    nas: NasConfig = field(default_factory=NasConfig)

    def __post_init__(self) -> None:
        if not self.model.from_path:  # else [model] is the pretrained source's, known once resolve_pretrained reads it
            check_seq_len(self)
        # ZeroRedundancyOptimizer wraps the optimizer and hides the hooks these optimizers need
        # (Hessian refresh, train/eval weights) or their split into two optimizers (Muon + AdamW).
        _check(self.parallel.activation_checkpointing != "budget" or self.train.compile,
               "parallel.activation_checkpointing", self.parallel.activation_checkpointing,
               "budget needs train.compile=true (the torch.compile partitioner does the recomputing)")
        _check(not (self.distill.teacher and self.train.loss_chunk), "train.loss_chunk", self.train.loss_chunk,
               "distillation compares whole logits with the teacher's; set train.loss_chunk=0 with distill.teacher")
        _check(self.precision.fp8 == "none" or (self.peft.method == "none" and self.qat.scheme == "none"),
               "precision.fp8", self.precision.fp8, "fp8 linears replace the linears that adapters (peft.method) "
               "and quantization-aware training (qat.scheme) also replace; use one of them")
        _check(self.optim.horizon == "steps" or self.train.time_limit_s > 0, "optim.horizon", self.optim.horizon,
               "a schedule over time needs the time it spans: set train.time_limit_s")
        _check(self.qat.scheme == "none" or self.peft.method == "none", "qat.scheme", self.qat.scheme,
               "quantization-aware training with adapters is not supported yet; fine-tune with qat alone, or "
               "use peft.method=qlora for a 4-bit base")
        _check(not (self.model.fuse_projections and self.parallel.strategy == "zero3"), "model.fuse_projections",
               self.model.fuse_projections, "the concatenated weights it keeps for backward would hold every layer's "
               "full weights, which parallel.strategy=zero3 shards; use it with none, ddp, zero1 or zero2")
        _check(self.train.gemm_kernel != "quack" or self.model.fuse_projections, "train.gemm_kernel",
               self.train.gemm_kernel, "it chooses the kernel of the fused layers' GEMMs, which are off: set "
               "model.fuse_projections=true too")
        _check(not (self.parallel.strategy == "zero1" and self.optim.name in ("sophia", "schedulefree_adamw", "muon")),
               "optim.name", self.optim.name, "it does not work with parallel.strategy=zero1 yet; use ddp, zero2 or zero3")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


# Model shapes by name. 'gpt2-124m' matches GPT-2 small's parameter count with a SwiGLU FFN whose
# three matrices hold as many weights as GPT-2's two 4*d matrices; '1b' is the TinyLlama-1.1B shape.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=0, max_seq_len=256),
    "small": dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=0, ffn_dim=0, max_seq_len=256),
    "gpt2-124m": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=0, ffn_dim=2048, max_seq_len=1024),
    "350m": dict(dim=1024, n_layers=24, n_heads=16, n_kv_heads=0, ffn_dim=2816, max_seq_len=2048),
    "1b": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, ffn_dim=5632, max_seq_len=2048),
}

SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "precision": PrecisionConfig,
            "train": TrainConfig, "log": LogConfig, "checkpoint": CheckpointConfig,
            "parallel": ParallelConfig, "peft": PeftConfig, "distill": DistillConfig,
            "qat": QatConfig, "nas": NasConfig}
# Spellings accepted in recipes and overrides for fields whose name is a Python keyword.
KEY_ALIASES: dict[str, str] = {"model.from": "model.from_path"}
# Keys that existed once: a saved run's config.toml that holds one at its default value still loads.
REMOVED_KEYS: dict[str, tuple[Any, str]] = {}


def field_help() -> list[tuple[str, str, Any, str]]:
    """(key, type, default, help) for every field, in declaration order: the source of --help."""
    rows = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            help_text = f.metadata.get("help", "")
            if f.metadata.get("choices"):
                help_text += f" (one of: {', '.join(map(str, f.metadata['choices']))})"
            rows.append((f"{section}.{f.name}", hints[f.name].__name__, f.default, help_text))
    return rows


def _all_keys() -> list[str]:
    return [key for key, *_ in field_help()]


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, _all_keys(), n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]}?" if close else " Run `hasten train --help` for the list."
    return ConfigError(f"Unknown config key {key!r}.{hint}")


def _not_a_choice(key: str, value: Any, choices: tuple[Any, ...]) -> ConfigError:
    words = [str(c) for c in choices]
    close = difflib.get_close_matches(str(value), words, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]}?" if close else ""
    return ConfigError(f"{key}={value!r} is not allowed: choose one of {', '.join(words)}.{hint}")


def _coerce(key: str, value: Any, kind: type, choices: tuple[Any, ...] | None) -> Any:
    """Convert a TOML or command-line value to the field's type, or explain why it cannot be."""
    if kind is bool and isinstance(value, str) and value.lower() in _BOOL_WORDS:
        value = _BOOL_WORDS[value.lower()]
    elif kind is int and isinstance(value, (str, float)) and not isinstance(value, bool):
        with contextlib.suppress(ValueError, OverflowError):
            value = int(value) if float(value).is_integer() else value
    elif kind is float and isinstance(value, (str, int)) and not isinstance(value, bool):
        with contextlib.suppress(ValueError):
            value = float(value)
    elif kind is str and not isinstance(value, str):
        value = str(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ConfigError(f"{key}={value!r} is not allowed: it must be {_KIND_WORDS[kind]}.")
    if choices and value not in choices:
        raise _not_a_choice(key, value, choices)
    return value


_BOOL_WORDS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False, "on": True,
               "off": False}
_KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _parse_override(arg: str) -> tuple[str, Any]:
    if "=" not in arg:
        raise ConfigError(f"Override {arg!r} is not of the form section.field=value.")
    key, raw = arg.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as bf16 or a path: keep it as a string
    return key, value


def _flatten(tree: dict[str, Any], where: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        key = f"{where}.{name}" if where else name
        if isinstance(value, dict):
            flat.update(_flatten(value, key))
        elif not where:
            raise ConfigError(f"Top-level key {name!r} must be a table such as [train]; known tables: {', '.join(SECTIONS)}.")
        else:
            flat[key] = value
    return flat


def build_config(values: dict[str, Any]) -> RunConfig:
    """Turn flat `section.field -> value` pairs into a validated RunConfig.

    A model preset is applied first, so that explicit model fields override it.
    """
    values = {KEY_ALIASES.get(key, key): value for key, value in values.items()}
    for key, (default, why) in REMOVED_KEYS.items():
        if key in values and values.pop(key) != default:
            raise ConfigError(f"{key} was removed: {why}. Drop it from the recipe or overrides.")
    known = set(_all_keys())
    for key in values:
        if key not in known:
            raise _unknown(key)
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    preset = values.get("model.preset", "")
    if preset:
        if preset not in MODEL_PRESETS:
            raise _not_a_choice("model.preset", preset, tuple(MODEL_PRESETS))
        sections["model"].update(MODEL_PRESETS[preset])
    for key, value in values.items():
        section, name = key.split(".", 1)
        cls = SECTIONS[section]
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        sections[section][name] = _coerce(key, value, typing.get_type_hints(cls)[name], f.metadata.get("choices"))
    return RunConfig(**{name: SECTIONS[name](**kwargs) for name, kwargs in sections.items()})


def recipe_path(name_or_path: str) -> Path:
    """A recipe file: a path on disk, or the name of a recipe shipped with hasten."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = importlib.resources.files("hasten") / "recipes" / f"{path.stem}.toml"
    if shipped.is_file():
        return Path(str(shipped))
    names = sorted(p.name.removesuffix(".toml") for p in (importlib.resources.files("hasten") / "recipes").iterdir()
                   if p.name.endswith(".toml"))
    raise ConfigError(f"Recipe {name_or_path!r} is neither a file nor a shipped recipe ({', '.join(names)}).")


def load_config(recipe: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a TOML recipe (default: the shipped `default` recipe) and apply dotted overrides."""
    path = recipe_path(str(recipe) if recipe is not None else "default")
    try:
        tree = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"Recipe {path} is not valid TOML: {err}.") from None
    values = _flatten(tree)
    for arg in overrides:
        key, value = _parse_override(arg)
        values[key] = value
    return build_config(values)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if value == value and abs(value) != float("inf") else str(value)  # nan, inf, -inf
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a valid TOML basic string


def dumps_toml(tree: dict[str, dict[str, Any]]) -> str:
    """TOML for a two-level table of scalars, which is all a RunConfig holds."""
    blocks = []
    for section, values in tree.items():
        lines = [f"[{section}]"] + [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def explicit_keys(recipe: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> set[str]:
    """The keys a recipe file (when given) and the overrides set explicitly, aliases resolved."""
    keys = set(_flatten(tomllib.loads(recipe_path(str(recipe)).read_text()))) if recipe is not None else set()
    keys |= {_parse_override(arg)[0] for arg in overrides}
    return {KEY_ALIASES.get(key, key) for key in keys}


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config as TOML; `load_config(path)` reads it back to an equal config."""
    Path(path).write_text(dumps_toml(config.to_dict()))
