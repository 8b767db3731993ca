"""Load a trained hasten model from a run, a checkpoint or an export; write safetensors exports.

An export folder holds `model.safetensors`, `config.json` (the hasten model config and vocabulary
size) and the tokenizer. A Hugging Face Llama layout is a separate format to be added beside this
one (`format="hf"`); the hasten format stays the one that round-trips every hasten model.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from hasten.config import ConfigError, ModelConfig, load_config
from hasten.train.checkpoint import STATE_FILE, list_checkpoints, load_model_weights

EXPORT_CONFIG = "config.json"
EXPORT_WEIGHTS = "model.safetensors"


def _find(path: Path) -> tuple[str, Path, Path]:
    """Classify `path` as ('export', folder, folder) or ('checkpoint', run_dir, checkpoint)."""
    if (path / EXPORT_WEIGHTS).exists() and (path / EXPORT_CONFIG).exists():
        return "export", path, path
    if (path / STATE_FILE).exists():  # a checkpoint folder: <run>/checkpoints/step_N
        return "checkpoint", path.parent.parent, path
    found = list_checkpoints(path)
    if (path / "config.toml").exists() and found:
        return "checkpoint", path, found[-1]
    raise ConfigError(f"{path} is not a hasten run folder with a checkpoint, a checkpoint folder, or an export folder.")


def load_trained(path: str | Path, device: str | torch.device = "cpu", merge: bool = True
                 ) -> tuple[nn.Module, Any, ModelConfig]:
    """(model in eval mode, tokenizer, model config) from a run folder, checkpoint or export. A PEFT
    run's adapters are merged into the base, unless `merge` is False."""
    from hasten.data import load_tokenizer
    from hasten.models import build_model

    from hasten.models.hf import is_hf_folder, load_hf_llama

    if is_hf_folder(path):  # a Hugging Face Llama-layout folder (e.g. written by --format hf)
        model, model_cfg = load_hf_llama(path, device)
        return model.eval(), load_tokenizer(path), model_cfg
    kind, root, weights = _find(Path(path))
    peft_cfg = None
    if kind == "export":
        meta = json.loads((root / EXPORT_CONFIG).read_text())
        model_cfg, vocab_size = ModelConfig(**meta["model"]), meta["vocab_size"]
    else:
        run_cfg = load_config(root / "config.toml")
        model_cfg, peft_cfg = run_cfg.model, run_cfg.peft
        vocab_size = None
    tokenizer = load_tokenizer(root / "tokenizer")
    if vocab_size is None:
        from hasten.models import resolve_vocab_size
        vocab_size = resolve_vocab_size(model_cfg, tokenizer.vocab_size)
    model = build_model(model_cfg, vocab_size, torch.device(device))
    if kind == "export":
        load_model(model, str(weights / EXPORT_WEIGHTS), device=str(device))
    elif peft_cfg is not None and peft_cfg.method != "none":  # a PEFT run: base, its adapters, merged
        from hasten.methods import peft
        from hasten.models.hf import load_pretrained

        if model_cfg.from_path:  # the checkpoint holds the adapters only; the base comes from model.from
            model = load_pretrained(model_cfg, device)
        if peft_cfg.method == "qlora":  # adapters trained on the NF4 base merge into the full-precision one,
            peft_cfg = replace(peft_cfg, method="lora")  # as QLoRA merges usually do (any device)
        model = peft.apply(model, peft_cfg)
        load_model_weights(weights, model)
        if merge:
            peft.merge(model)
    else:
        load_model_weights(weights, model)
    return model.eval(), tokenizer, model_cfg


def export_run(path: str | Path, out_dir: str | Path | None = None, *, merge: bool = True,
               format: str = "hasten") -> Path:
    """Write the newest weights of a run as safetensors + config + tokenizer; returns the folder.

    Adapters of a PEFT run are merged into the base weights (`merge`). format="hf" writes a folder
    transformers' AutoModelForCausalLM loads; with merge=False (PEFT runs from a Hugging Face
    model.from only) it writes the adapters alone, in peft's format, for `PeftModel.from_pretrained`."""
    if format not in ("hasten", "hf"):
        raise ConfigError(f"Export format {format!r} is not allowed: choose hasten or hf.")
    if not merge:
        return _export_adapter(path, out_dir, format)
    model, tokenizer, model_cfg = load_trained(path)
    kind, root, _ = _find(Path(path))
    out = Path(out_dir) if out_dir else root / ("export-hf" if format == "hf" else "export")
    if format == "hf":
        from hasten.models.hf import save_hf_llama

        return save_hf_llama(model, out, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / EXPORT_WEIGHTS))  # de-duplicates tied embedding/head weights
    meta = dict(format="hasten", model=asdict(model_cfg), vocab_size=model.tok_embeddings.num_embeddings)
    (out / EXPORT_CONFIG).write_text(json.dumps(meta, indent=1))
    if kind != "export":
        shutil.rmtree(out / "tokenizer", ignore_errors=True)
        tokenizer.save(out / "tokenizer")
    return out


def _export_adapter(path: str | Path, out_dir: str | Path | None, format: str) -> Path:
    """The adapters of a PEFT run, unmerged, in peft's format (base: the run's Hugging Face model.from)."""
    from hasten.models.hf import is_hf_folder, save_hf_adapter

    kind, root, _ = _find(Path(path))
    config = load_config(root / "config.toml") if kind != "export" else None
    if config is None or config.peft.method == "none":
        raise ConfigError(f"{path} is not a PEFT run: only adapters can be exported unmerged; export it merged.")
    if format != "hf" or not is_hf_folder(config.model.from_path):
        raise ConfigError("Unmerged adapters are written in peft's format (--format hf) for a run whose model.from "
                          "is a Hugging Face folder; export merged otherwise.")
    model, tokenizer, _ = load_trained(path, merge=False)
    out = save_hf_adapter(model, Path(out_dir) if out_dir else root / "adapter-hf", config.peft,
                          str(Path(config.model.from_path).resolve()))
    tokenizer.save(out)
    return out

