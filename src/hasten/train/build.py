"""Assemble a run in the fixed order of DESIGN.md: config → data → model → precision → compile →
optimizer → loss → loop. Later method families (teacher, QAT, PEFT, parallel) insert their step
here, in that order; nothing is reordered silently.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hasten.config import ConfigError, RunConfig, TrainConfig, save_config
from hasten.methods.precision import Precision, make_grad_scaler, resolve_precision
from hasten.optim import build_optimizer, build_schedule
from hasten.optim.hooks import CurvatureOptimizer
from hasten.optim.schedule import Schedule
from hasten.parallel import wrap_optimizer

Batch = tuple[torch.Tensor, ...]
BatchFn = Callable[[int, int], Batch]  # (step, micro) -> batch on the CPU
# (model, batch on device) -> scalar loss, or (loss, {name: scalar}) whose terms the loop logs
LossFn = Callable[[nn.Module, Batch], torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]]


def _forward(model: nn.Module, batch: Batch, **kwargs: Any) -> torch.Tensor:
    """The model on a batch (inputs, targets[, positions]): packed instruction data adds the
    positions that separate its records (hasten.data.instruct)."""
    return model(batch[0], positions_BT=batch[2], **kwargs) if len(batch) > 2 else model(batch[0], **kwargs)


def lm_loss(model: nn.Module, batch: Batch, *, loss_chunk: int = 0
            ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token cross-entropy of a language model that maps ids_BT to logits_BTV.

    With `loss_chunk` > 0 the model (hasten's Decoder) computes the loss itself from its last
    hidden states, that many tokens at a time, without the whole logits (train.loss_chunk).

    When layers recorded auxiliary losses in this (training) forward, e.g. MoE load balancing and
    router z-loss, their weighted sum is added, and the cross-entropy and each term are returned
    alongside for logging. Evaluation forwards record none, so validation loss is plain CE."""
    from hasten.models.moe import auxiliary_losses

    if loss_chunk > 0:
        ce = _forward(model, batch, targets_BT=batch[1], loss_chunk=loss_chunk)
    else:
        logits = _forward(model, batch)
        ce = F.cross_entropy(logits.view(-1, logits.size(-1)), batch[1].view(-1))
    aux, terms = auxiliary_losses(model)
    if aux is None:
        return ce
    return ce + aux, {"ce": ce.detach(), **terms}


def distill_lm_loss(model: nn.Module, batch: Batch, *, teacher: nn.Module, alpha: float, temperature: float,
                    vocab: int) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`lm_loss` with a teacher (hasten.methods.distill): (1 - alpha) * cross-entropy + alpha * the
    distillation term over the positions that have a target, the two logged apart as `ce` and `kd`.
    The teacher runs without gradients; the first `vocab` logits (the tokenizer's, before any
    padding) are compared. Evaluation forwards return the plain cross-entropy."""
    from hasten.methods.distill import kd_loss
    from hasten.models.moe import auxiliary_losses
    from hasten.models.ops.cross_entropy import IGNORE_INDEX

    logits = _forward(model, batch)
    ce = F.cross_entropy(logits.view(-1, logits.size(-1)), batch[1].view(-1))
    if not model.training:
        return ce
    with torch.no_grad():
        teacher_logits = _forward(teacher, batch)
    kd = kd_loss(logits[..., :vocab], teacher_logits[..., :vocab], temperature, mask=batch[1] != IGNORE_INDEX)
    loss = (1 - alpha) * ce + alpha * kd
    aux, terms = auxiliary_losses(model)
    if aux is not None:
        loss = loss + aux
    return loss, {"ce": ce.detach(), "kd": kd.detach(), **terms}


def lm_sampled_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy against next tokens sampled from the model's own predictions: the loss whose
    gradient gives SophiaG's Gauss-Newton-Bartlett Hessian estimate (the true targets are unused)."""
    from hasten.optim import sampled_label_loss

    logits = _forward(model, batch)
    return sampled_label_loss(logits.view(-1, logits.size(-1)))


@dataclass
class Run:
    """Everything the loop needs, built once. The loop owns no other state than its counters."""

    config: RunConfig
    run_dir: Path
    device: torch.device
    model: nn.Module
    loss_fn: LossFn
    train_batches: BatchFn
    val_batches: BatchFn | None
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    precision: Precision
    scaler: torch.amp.GradScaler | None
    tokens_per_micro_batch: int
    flops_per_token: float | None = None
    tokenizer: Any = None
    info: dict[str, Any] = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1
    sampled_loss_fn: LossFn | None = None  # loss on labels sampled from the model (Hessian refresh)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but no CUDA GPU is visible; use train.device=cpu or auto.")
    return device


def cpu_compiler() -> str:
    """The C++ compiler torch.compile's Inductor builds CPU code with: $CXX, else its platform default."""
    return os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")


def check_cpu_compile(compiles: bool, device: torch.device) -> None:
    """train.compile on the CPU needs that compiler; without it the first step would fail deep in Inductor."""
    if compiles and device.type == "cpu" and shutil.which(cpu_compiler()) is None:
        raise ConfigError(f"train.compile=true on the CPU needs a C++ compiler for the generated code, and "
                          f"{cpu_compiler()!r} is not installed (set CXX to use another): install one, or set "
                          "train.compile=false.")


def _rank_and_world() -> tuple[int, int]:
    from hasten.parallel import rank_and_world

    return rank_and_world()


def prepare_run_dir(config: RunConfig, rank: int) -> Path:
    """Create the run folder and save the resolved config; a fresh run clears an old run's state."""
    run_dir = Path(config.train.out_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if config.train.resume == "none":
            for stale in ("checkpoints", "tensorboard"):
                shutil.rmtree(run_dir / stale, ignore_errors=True)
            for stale in ("metrics.jsonl", "summary.json", "loss.png"):
                (run_dir / stale).unlink(missing_ok=True)
        save_config(config, run_dir / "config.toml")
    return run_dir


# Validation batches are drawn with this seed whatever train.seed is, so that runs of different
# seeds are scored on the same validation windows and their losses compare (1338: the default
# train.seed, 1337, + 1).
VAL_SEED = 1338


def _token_batches(tokens: Any, config: RunConfig, seed: int, rank: int, world: int, pin: bool) -> BatchFn:
    from hasten.data import WindowSampler

    sampler = WindowSampler(tokens, config.train.seq_len, config.train.batch_size, seed=seed, rank=rank,
                            world_size=world, pin_memory=pin)
    return sampler.batch


def _rank0_first(fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0, then on the other ranks (which then find rank 0's cached results)."""
    barrier = torch.distributed.barrier if torch.distributed.is_initialized() else (lambda: None)
    if _rank_and_world()[0] != 0:
        barrier()
    result = fn()
    if _rank_and_world()[0] == 0:
        barrier()
    return result


def _build_lm(config: RunConfig, run_dir: Path, device: torch.device, rank: int, world: int) -> dict[str, Any]:
    """Data and model for hasten's own language-model runs."""
    from hasten.data import prepare_data, unigram_cross_entropy
    from hasten.models import resolve_vocab_size

    from hasten.data.instruct import is_instruct_source

    if is_instruct_source(config.data.source):
        return _build_instruct(config, run_dir, device, rank, world)
    data = _rank0_first(lambda: prepare_data(config.data))  # one rank tokenizes, the others read its cache
    if rank == 0:
        data.tokenizer.save(run_dir / "tokenizer")
    vocab_size = resolve_vocab_size(config.model, data.tokenizer.vocab_size)
    torch.manual_seed(config.train.seed)
    model = lm_model(config, vocab_size, device)
    pin = device.type == "cuda"
    return dict(
        model=model, tokenizer=data.tokenizer, loss_fn=_lm_loss_fn(config), sampled_loss_fn=lm_sampled_loss,
        train_batches=_token_batches(data.train, config, config.train.seed, rank, world, pin),
        val_batches=_token_batches(data.val, config, VAL_SEED, rank, world, pin),
        flops_per_token=model.flops_per_token(config.train.seq_len),
        info=dict(train_tokens=int(len(data.train)), val_tokens=int(len(data.val)),
                  unigram_val_loss=unigram_cross_entropy(data.train, data.val, data.tokenizer.vocab_size),
                  params=model.num_params(), vocab_size=vocab_size, tokenizer=data.tokenizer.name),
    )


def _lm_loss_fn(config: RunConfig) -> LossFn:
    return functools.partial(lm_loss, loss_chunk=config.train.loss_chunk)


def lm_model(config: RunConfig, vocab_size: int, device: torch.device) -> nn.Module:
    """A fresh decoder, or the pretrained one of model.from (docs/peft.md)."""
    from hasten.models import build_model
    from hasten.models.hf import load_pretrained

    return load_pretrained(config.model, device) if config.model.from_path else build_model(config.model, vocab_size, device)


def _build_instruct(config: RunConfig, run_dir: Path, device: torch.device, rank: int, world: int) -> dict[str, Any]:
    """Instruction JSONL (prompt/response): loss on response tokens only (hasten.data.instruct)."""
    from hasten.data import ByteTokenizer, load_tokenizer
    from hasten.data.instruct import InstructBatches, PackedInstructBatches, load_records, split_records
    from hasten.models import resolve_vocab_size

    name = config.data.tokenizer
    if name == "bpe":
        raise ConfigError("Instruction data needs a fixed tokenizer: set model.from (its tokenizer is used), or "
                          "data.tokenizer=byte or a folder holding tokenizer.json.")
    tokenizer = ByteTokenizer() if name == "byte" else load_tokenizer(name)
    if rank == 0:
        tokenizer.save(run_dir / "tokenizer")
    folder = name if name not in ("byte", "bpe") else None  # a tokenizer folder: its chat template, if any
    train_recs, val_recs = split_records(load_records(config.data.source, folder), config.data.val_fraction)
    vocab_size = resolve_vocab_size(config.model, tokenizer.vocab_size)
    torch.manual_seed(config.train.seed)
    model = lm_model(config, vocab_size, device)
    seq, bs, seed = config.train.seq_len, config.train.batch_size, config.train.seed
    packable = model.supports_packing()
    if config.data.pack == "on" and not packable:
        raise ConfigError("data.pack=on needs attention in every layer (a Mamba-2 scan would carry state from one "
                          "record into the next); set data.pack=off or auto.")
    batches = PackedInstructBatches if config.data.pack == "on" or config.data.pack == "auto" and packable \
        else InstructBatches
    train = batches(train_recs, tokenizer, seq, bs, seed, rank, world)
    val = batches(val_recs, tokenizer, seq, bs, VAL_SEED, rank, world) if val_recs else None
    return dict(
        model=model, tokenizer=tokenizer, loss_fn=_lm_loss_fn(config), sampled_loss_fn=lm_sampled_loss,
        train_batches=train.batch, val_batches=val.batch if val else None,
        flops_per_token=model.flops_per_token(seq),
        info=dict(train_records=len(train_recs), val_records=len(val_recs), params=model.num_params(),
                  vocab_size=model.vocab_size, tokenizer=tokenizer.name),
    )


def _with_teacher(parts: dict[str, Any], config: RunConfig, device: torch.device, precision: Precision
                  ) -> dict[str, Any]:
    """Swap in the distillation loss around the frozen teacher of distill.teacher: eval mode, no
    gradients, in the run's 16-bit dtype when it has one (it only runs forward). It is not part of
    the model, so checkpoints hold the student alone; a resumed run loads the teacher again."""
    from hasten.data.instruct import is_instruct_source
    from hasten.train.export import load_trained

    teacher, tokenizer, teacher_cfg = load_trained(config.distill.teacher, device)
    student_vocab = parts["tokenizer"].vocab_size
    if tokenizer.vocab_size != student_vocab:
        raise ConfigError(f"distill.teacher={config.distill.teacher!r} has a tokenizer of {tokenizer.vocab_size} "
                          f"tokens and this run one of {student_vocab}: distillation compares one vocabulary; "
                          "leave data.tokenizer to the teacher's (and model.from to a model that shares it).")
    if config.train.seq_len > teacher_cfg.max_seq_len:
        raise ConfigError(f"train.seq_len={config.train.seq_len} is not allowed: the teacher's positions end at "
                          f"{teacher_cfg.max_seq_len} (model.max_seq_len of distill.teacher)")
    if is_instruct_source(config.data.source) and config.data.pack != "off" and not teacher.supports_packing():
        raise ConfigError("distill.teacher has Mamba-2 layers, which cannot read packed records; set data.pack=off.")
    teacher.requires_grad_(False)
    if precision.name != "fp32":
        teacher.to(precision.dtype)
    parts["loss_fn"] = functools.partial(distill_lm_loss, teacher=teacher, alpha=config.distill.alpha,
                                         temperature=config.distill.temperature, vocab=student_vocab)
    if parts.get("flops_per_token") is not None:  # the teacher's forward: a third of its forward + backward
        parts["flops_per_token"] += teacher.flops_per_token(config.train.seq_len) / 3
    parts["info"].update(teacher=config.distill.teacher, teacher_params=teacher.num_params())
    return parts


def _items_per_batch(train_batches: BatchFn) -> int:
    """What a user batch counts for throughput: token ids (an integer first tensor) count one each,
    otherwise each row of the first tensor is one item."""
    first = train_batches(0, 0)[0]
    return first.numel() if not (first.is_floating_point() or first.is_complex()) else first.shape[0]


def build_run(config: RunConfig, *, model: nn.Module | None = None, loss_fn: LossFn | None = None,
              train_batches: BatchFn | None = None, val_batches: BatchFn | None = None,
              sampled_loss_fn: LossFn | None = None) -> Run:
    """Build a run. Without a model, hasten builds its decoder and token data from the config;
    with one, the caller supplies `loss_fn` and `train_batches` (and optionally `val_batches`, and
    `sampled_loss_fn` for optimizers that estimate curvature from sampled labels, like SophiaG)."""
    from hasten.parallel import check_launch, init_distributed, rank_device

    if model is not None and config.train.loss_chunk:
        raise ConfigError("train.loss_chunk applies to hasten's own decoder; a model passed in computes its "
                          "loss in its loss_fn (set train.loss_chunk=0).")
    if model is not None and config.distill.teacher:
        raise ConfigError("distill.teacher applies to hasten's own language models; with your own model, add "
                          "hasten.methods.distill.kd_loss to your loss_fn.")
    if model is not None and config.qat.scheme != "none" and config.parallel.strategy in ("zero2", "zero3"):
        raise ConfigError(f"qat.scheme with parallel.strategy={config.parallel.strategy} quantizes a whole copy of "
                          "hasten's own model after training; with your own model use none, ddp or zero1.")
    device = resolve_device(config.train.device)
    init_distributed(device)  # under torchrun: start the process group from its environment
    device = rank_device(device)
    check_cpu_compile(config.train.compile, device)
    rank, world = _rank_and_world()
    check_launch(config.parallel, world)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    if model is None:
        from hasten.models.hf import resolve_pretrained, resolve_teacher

        config = resolve_pretrained(config)  # model.from: its shape and tokenizer, saved in config.toml
        config = resolve_teacher(config)  # distill.teacher: its tokenizer, unless model.from gave one
    run_dir = prepare_run_dir(config, rank)
    if model is None:
        parts = _build_lm(config, run_dir, device, rank, world)
        parts["tokens_per_micro_batch"] = config.train.batch_size * config.train.seq_len
    else:
        if loss_fn is None or train_batches is None:
            raise ConfigError("A user model needs loss_fn(model, batch) and train_batches(step, micro) as well.")
        model.to(device)
        parts = dict(model=model, loss_fn=loss_fn, train_batches=train_batches, val_batches=val_batches,
                     sampled_loss_fn=sampled_loss_fn,
                     tokenizer=None, flops_per_token=None, tokens_per_micro_batch=_items_per_batch(train_batches),
                     info=dict(params=sum(p.numel() for p in model.parameters())))
    precision = resolve_precision(config.precision, device)  # known first: the teacher is held in its dtype
    if config.distill.teacher:  # order: model → teacher → (qat.prepare) → peft.apply → precision → parallel
        parts = _with_teacher(parts, config, device, precision)
    if config.qat.scheme != "none" and config.qat.fake_quant:  # order: model → teacher → qat.prepare → peft.apply
        from hasten.methods import qat

        qat.prepare(parts["model"], config.qat)
    if config.peft.method != "none":  # order: model → teacher → (qat.prepare) → peft.apply → precision → parallel
        from hasten.methods import peft

        parts["model"] = peft.apply(parts["model"], config.peft)
        trainable, total = peft.param_counts(parts["model"])
        parts["info"].update(trainable_params=trainable, total_params=total, peft=config.peft.method)
        parts["flops_per_token"] = None  # 6N over all weights no longer describes an adapter step
    if config.precision.fp8 != "none":  # order: ... → peft.apply → precision (fp8 linears) → parallel
        from hasten.methods.precision import convert_fp8

        parts["info"]["fp8_linears"] = len(convert_fp8(parts["model"], config.precision.fp8, device))
    if config.peft.method != "none" and precision.name != "fp32" and config.parallel.strategy == "none":
        peft.cast_frozen(parts["model"], precision.dtype)  # FSDP2's mixed-precision policy does this when sharded
        peft.keep_adapter_input_dtype(parts["model"])
    select_attention_backend(config.train.attention_backend, device)
    select_loss_kernel(config.train.loss_kernel, device, precision)
    gemm = select_gemm_kernel(config.train, config.model.fuse_projections and device.type == "cuda", device, precision)
    if config.model.fuse_projections and device.type == "cuda":
        parts["info"]["gemm_kernel"] = gemm
    parts["model"] = parallelize(parts["model"], config, device, precision)
    optimizer = build_optimizer(parts["model"], config.optim, device)
    if isinstance(optimizer, CurvatureOptimizer) and parts.get("sampled_loss_fn") is None:
        raise ConfigError(f"optim.name={config.optim.name} estimates curvature from labels sampled from the model: "
                          "pass sampled_loss_fn(model, batch) with your model (hasten.optim.sampled_label_loss "
                          "turns logits into that loss), or choose another optim.name.")
    optimizer = wrap_optimizer(optimizer, config.parallel)  # ZeRO-1 shards the states of the optimizer just built
    return Run(config=config, run_dir=run_dir, device=device, optimizer=optimizer,
               schedule=build_schedule(config.optim, config.train.steps), precision=precision,
               scaler=make_grad_scaler(precision, config.precision),
               rank=rank, world_size=world, **parts)


def parallelize(model: nn.Module, config: RunConfig, device: torch.device, precision: Precision) -> nn.Module:
    """Activation checkpointing → compile → sharding per block then root (hasten.parallel says why
    at each step). Without a strategy, compilation is whole-graph, in `compiled_loss`, unless
    train.compile_scope=blocks asks for it here, per block."""
    from hasten.parallel import apply_parallelism, blocks_of, set_memory_budget

    # The partitioner's budget is process-wide: set for every run, so one run's never leaks into the next.
    budget = config.parallel.activation_checkpointing == "budget"
    set_memory_budget(config.parallel.activation_memory_budget if budget else 1.0)
    distributed = config.parallel.strategy != "none"
    if distributed and precision.name == "fp16" and config.parallel.strategy in ("zero2", "zero3"):
        raise ConfigError("precision.dtype=fp16 is not supported with sharded gradients (zero2, zero3); "
                          "use bf16, which needs no loss scaling.")
    param_dtype = precision.dtype if distributed and precision.name == "bf16" else None
    per_block = compiles_per_block(config)
    if per_block and not distributed and not blocks_of(model):
        raise ConfigError("train.compile_scope=blocks compiles the blocks of the model's `layers` nn.ModuleList, "
                          "and this model has none; use train.compile_scope=model.")
    compile_mode = config.train.compile_mode if per_block else None
    return apply_parallelism(model, config.parallel, device, param_dtype=param_dtype, compile_mode=compile_mode)


def compiles_per_block(config: RunConfig) -> bool:
    """Whether train.compile compiles each block alone (`parallelize`): always in a distributed run,
    with train.compile_scope=blocks in one process; else the forward and loss as one graph (`compiled_loss`)."""
    return config.train.compile and (config.parallel.strategy != "none" or config.train.compile_scope == "blocks")


def compiled_loss(run: Run) -> Callable[[Batch], torch.Tensor]:
    """The forward + loss function the loop calls; compiled as one graph when train.compile is set
    (and train.compile_scope=model), so the loss fuses with the output head instead of materializing
    fp32 logits."""
    fn = functools.partial(run.loss_fn, run.model)
    if run.config.train.compile and not compiles_per_block(run.config):
        mode = run.config.train.compile_mode
        fn = torch.compile(fn, mode=None if mode == "default" else mode)
    return fn


def select_attention_backend(name: str, device: torch.device) -> None:
    """Restrict SDPA to one kernel family (process-wide, as PyTorch's flags are). `auto` leaves
    PyTorch's own order; cuDNN attention is often the fastest on Hopper but not PyTorch's first pick.
    `fa4` puts FlashAttention-4's kernels behind SDPA's flash backend (PyTorch's own registry), so
    compiled graphs call them like any SDPA kernel."""
    if name == "auto" or device.type != "cuda":
        return
    if name == "fa4":
        activate_fa4(device)
    torch.backends.cuda.enable_flash_sdp(name in ("flash", "fa4"))
    torch.backends.cuda.enable_cudnn_sdp(name == "cudnn")
    torch.backends.cuda.enable_mem_efficient_sdp(name == "efficient")
    torch.backends.cuda.enable_math_sdp(name == "math")


def select_loss_kernel(name: str, device: torch.device, precision: Precision) -> None:
    """train.loss_kernel, set process-wide for this run (hasten.models.ops.cross_entropy.set_kernel),
    after checking that a kernel asked for by name can run here."""
    from hasten.models.ops import cross_entropy, triton_cross_entropy

    if name == "quack":
        if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
            where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
            raise ConfigError(f"train.loss_kernel=quack runs on a Hopper GPU (compute capability 9.0); this run is "
                              f"on {where}: use train.loss_kernel=auto")
        error = cross_entropy.quack_import_error()
        if error is not None:
            raise ConfigError(f"train.loss_kernel=quack needs the quack-kernels package (pip install 'hasten[quack]'), "
                              f"which did not import ({error[:300]})")
        if precision.name != "bf16":
            raise ConfigError(f"train.loss_kernel=quack computes in bf16; precision is {precision.name}: "
                              "use precision.dtype=bf16 or train.loss_kernel=auto")
    if name == "triton" and (device.type != "cuda" or not triton_cross_entropy.available()):
        why = "Triton did not import" if device.type == "cuda" else f"this run is on {device.type}"
        raise ConfigError(f"train.loss_kernel=triton runs on CUDA with Triton installed; {why}: "
                          "use train.loss_kernel=auto")
    cross_entropy.set_kernel(name)


def select_gemm_kernel(train: TrainConfig, fused: bool, device: torch.device, precision: Precision) -> str:
    """train.gemm_kernel, resolved and set process-wide for this run
    (hasten.models.ops.projections.set_gemm_kernel); returns what the fused layers' GEMMs run on.
    `auto` takes QuACK's GEMM for fused layers (`fused`) on a Hopper GPU under bf16 when quack-kernels
    imports and small products through its GEMM and its gated GEMMs match fp32 ones, else cuBLAS (with a
    warning when QuACK is installed but fails)."""
    from hasten.models.ops import projections

    name = train.gemm_kernel
    hopper = device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)
    if name == "quack":
        if not hopper:
            where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
            raise ConfigError(f"train.gemm_kernel=quack runs on a Hopper GPU (compute capability 9.0); this run is "
                              f"on {where}: use train.gemm_kernel=auto or cublas")
        if precision.name != "bf16":
            raise ConfigError(f"train.gemm_kernel=quack computes in bf16; precision is {precision.name}: "
                              "use precision.dtype=bf16 or train.gemm_kernel=auto")
        error = projections.quack_gemm_error()
        if error is not None:
            raise ConfigError(f"train.gemm_kernel=quack needs the quack-kernels package (pip install 'hasten[quack]'), "
                              f"which did not import ({error[:300]})")
    elif name == "auto":
        error = projections.quack_gemm_error() if fused and hopper and precision.name == "bf16" else "not used"
        if error is None:
            error = _quack_gemm_probe(device)
            if error is not None:
                warnings.warn(f"quack-kernels is installed but its GEMMs failed ({error[:300]}); the fused layers' "
                              "GEMMs run on cuBLAS", stacklevel=2)
        name = "quack" if error is None else "cublas"
    projections.set_gemm_kernel(name, tuned=train.gemm_tune)
    return name


def _quack_gemm_probe(device: torch.device) -> str | None:
    """Small products through QuACK's kernels against fp32 ones: its GEMM, and the SwiGLU feed-forward in
    its gated GEMMs (`projections.swiglu_mlp`, forward and backward). None when they agree, else why not
    (a kernel that fails to compile against a mismatched nvidia-cutlass-dsl, or a QuACK whose gated GEMMs
    take other arguments, fails here)."""
    from hasten.models.ops import projections

    def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
        return ((out.float() - ref).norm() / ref.norm()).item()

    try:
        a, b = (torch.randn(256, 256, device=device, dtype=torch.bfloat16) for _ in range(2))
        errors = {"gemm": rel(torch.ops.quack.gemm(a, b, tuned=False), a.float() @ b.float())}
        x = torch.randn(256, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
        w13 = (torch.randn(512, 128, device=device) * 0.1).requires_grad_()
        w2 = (torch.randn(128, 256, device=device) * 0.1).requires_grad_()
        projections.set_gemm_kernel("quack", tuned=False)
        try:
            with torch.autocast("cuda", torch.bfloat16):
                y = projections.swiglu_mlp(x, w13, w2)
            grads = torch.autograd.grad(y.float().square().sum(), (x, w13, w2))
        finally:
            projections.set_gemm_kernel("cublas")
        x32 = x.detach().float().requires_grad_()
        gate, up = (x32 @ w13.t()).chunk(2, dim=-1)
        y_ref = (torch.nn.functional.silu(gate) * up) @ w2.t()
        grads_ref = torch.autograd.grad(y_ref.square().sum(), (x32, w13, w2))
        errors["gated forward"] = rel(y, y_ref)
        errors.update({f"gated gradient {i}": rel(g, r) for i, (g, r) in enumerate(zip(grads, grads_ref))})
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    bad = {k: v for k, v in errors.items() if not v < 2e-2}
    return None if not bad else "; ".join(f"{k}: relative error {v:.3g} against fp32" for k, v in bad.items())


def activate_fa4(device: torch.device) -> None:
    """Register FlashAttention-4 (the `flash-attn-4` package, `flash_attn.cute`) as the kernel of
    SDPA's flash backend, through `torch.nn.attention.activate_flash_attention_impl`."""
    import importlib.util

    from torch.nn import attention

    if not hasattr(attention, "activate_flash_attention_impl"):
        raise ConfigError(f"train.attention_backend=fa4 needs a PyTorch with "
                          f"torch.nn.attention.activate_flash_attention_impl (this one is {torch.__version__})")
    if importlib.util.find_spec("flash_attn") is None or importlib.util.find_spec("flash_attn.cute") is None:
        raise ConfigError("train.attention_backend=fa4 needs the flash-attn-4 package (pip install flash-attn-4), "
                          "which provides flash_attn.cute")
    major, minor = torch.cuda.get_device_capability(device)
    if major not in (9, 10):
        raise ConfigError(f"train.attention_backend=fa4 runs on compute capability 9.x or 10.x (Hopper, Blackwell); "
                          f"{torch.cuda.get_device_name(device)} is {major}.{minor}")
    if getattr(attention, "current_flash_attention_impl", lambda: None)() == "FA4":
        return
    try:
        from torch.nn.attention import _fa4
    except ImportError as err:
        raise ConfigError(f"train.attention_backend=fa4: this PyTorch ({torch.__version__}) has no FA4 entry") from err
    # PyTorch's entry, pointed at hasten's adapter (flash-attn-4's forward returns more than it unpacks)
    attention.register_flash_attention_impl("FA4", register_fn=functools.partial(
        _fa4.register_flash_attention_fa4, module_path="hasten.models.fa4_adapter"))
    attention.activate_flash_attention_impl("FA4")
