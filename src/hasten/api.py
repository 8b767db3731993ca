"""The Python entry points: `hasten.train`, `hasten.generate_text`, `hasten.export`."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hasten.config import RunConfig, load_config
from hasten.parallel import is_sharded, unwrap
from hasten.train.build import BatchFn, LossFn, Run, build_run
from hasten.train.export import export_run, load_trained
from hasten.train.loop import evaluate, train_loop
from hasten.train.metrics import parameter_bytes


def train(config: RunConfig | None = None, *, model: nn.Module | None = None, loss_fn: LossFn | None = None,
          train_batches: BatchFn | None = None, val_batches: BatchFn | None = None,
          sampled_loss_fn: LossFn | None = None) -> dict[str, Any]:
    """Train and return the run's metrics (also written to `<out_dir>/summary.json`).

    With no model, hasten builds its decoder and data from the config. With your own `model`,
    pass `loss_fn(model, batch) -> loss` and `train_batches(step, micro) -> tuple of tensors`
    (and optionally `val_batches(i, 0)`, and `sampled_loss_fn(model, batch)`, the loss on labels
    sampled from the model, for optim.name=sophia); the loop, precision, schedule, checkpoints,
    guards and metrics are the same.
    """
    config = config or load_config()
    run = build_run(config, model=model, loss_fn=loss_fn, train_batches=train_batches, val_batches=val_batches,
                    sampled_loss_fn=sampled_loss_fn)
    summary = train_loop(run)
    if config.qat.scheme != "none" and summary["steps"]:
        summary.update(quantize_after_training(run))
    # A sharded model's forward is a collective: every rank samples (same seed, same text), rank 0 keeps it.
    # It runs under the run's autocast, as training did: a 16-bit PEFT run's base and adapter inputs are 16-bit.
    if run.tokenizer is not None and config.log.sample_tokens and summary["steps"] and (
            run.rank == 0 or is_sharded(run.model)):
        with run.precision.autocast():
            text = sample(unwrap(run.model), run.tokenizer, config.log.sample_prompt, config.log.sample_tokens)
        if run.rank == 0:
            summary["sample"] = text
    return summary


def _gathered_copy(run: Run) -> nn.Module:
    """A plain (unsharded) copy of a sharded language model with its trained weights, on every rank:
    quantized tensors are made from whole weights. Costs one whole model per rank, once."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from hasten.methods import qat
    from hasten.train.build import lm_model

    full = get_model_state_dict(run.model, options=StateDictOptions(full_state_dict=True))  # a collective
    model = lm_model(run.config, run.info["vocab_size"], run.device)
    if run.config.qat.fake_quant:
        qat.prepare(model, run.config.qat)  # the trained modules, so QAT's own convert step applies
    model.load_state_dict(full)
    return model


def quantize_after_training(run: Run) -> dict[str, Any]:
    """The trained model quantized in place (QAT's convert, or post-training quantization when it
    trained in float), its validation loss and weight bytes; rank 0 saves it and adds these to
    summary.json. Every rank converts and evaluates (the loss is averaged over ranks); a sharded
    model (zero2, zero3) is first gathered into a plain copy on every rank."""
    from hasten.methods import qat

    model = _gathered_copy(run) if is_sharded(run.model) else unwrap(run.model)
    float_bytes = parameter_bytes(model)
    qat.convert(model, run.config.qat)
    quantized = dict(qat_scheme=run.config.qat.scheme, qat_fake_quant=run.config.qat.fake_quant,
                     quantized_val_loss=evaluate(run, functools.partial(run.loss_fn, model)),
                     float_weight_bytes=float_bytes, quantized_weight_bytes=parameter_bytes(model))
    if run.rank == 0:
        qat.save_quantized(model, run.run_dir)
        path = run.run_dir / "summary.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **quantized}, indent=1, default=str))
        print(f"quantized ({run.config.qat.scheme}): val loss {quantized['quantized_val_loss']:.4f}, weights "
              f"{float_bytes / 2**20:.1f} -> {quantized['quantized_weight_bytes'] / 2**20:.1f} MiB, "
              f"saved {run.run_dir / qat.QUANTIZED_FILE}", flush=True)
    return quantized


def sample(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int, temperature: float = 0.8,
           top_k: int = 50, seed: int = 0) -> str:
    """Decode `max_new_tokens` sampled after `prompt`."""
    from hasten.models import generate

    device = next(model.parameters()).device
    ids = generate(model, tokenizer.encode(prompt), max_new_tokens, temperature=temperature, top_k=top_k,
                   seed=seed, device=device)
    return tokenizer.decode(ids)


def generate_text(path: str | Path, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: int = 50, seed: int = 0, device: str = "auto", quantized: bool = False) -> str:
    """Sample from a trained run, checkpoint or export folder; `quantized`: from the quantized model
    a `qat.scheme` run saved (quantized.pt), the one it would deploy."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if quantized:
        from hasten.methods.qat import load_quantized

        model, tokenizer = load_quantized(path, device)
    else:
        model, tokenizer, _ = load_trained(path, device)
    return sample(model, tokenizer, prompt, max_new_tokens, temperature, top_k, seed)


def export(path: str | Path, out_dir: str | Path | None = None, *, merge: bool = True, format: str = "hasten") -> Path:
    """Export a run's newest weights (PEFT adapters merged) to safetensors + config + tokenizer;
    format="hf" writes a Hugging Face Llama folder."""
    return export_run(path, out_dir, merge=merge, format=format)
