"""Hugging Face Llama-layout checkpoints in and out of hasten's Decoder.

    model, model_cfg = load_hf_llama("path/to/hf-folder")      # config.json + *.safetensors
    save_hf_llama(model, "out/", tokenizer)                    # a folder transformers loads

Llama, Mistral and Qwen2 configs map one to one (a sliding window shorter than the model caps
max_seq_len, where windowed and full attention agree; Qwen2's q/k/v biases set model.qkv_bias):
transformers applies rotate-half RoPE to its own weights, exactly like hasten's `apply_rope`, so
q/k projections are copied as they are (the q/k permutation of the conversion scripts concerns
Meta's original checkpoints only). A model with qkv_bias is written back as Qwen2ForCausalLM,
since Llama's attention_bias would add an o_proj bias too.

Name map (HF -> hasten):
    model.embed_tokens                       -> tok_embeddings
    model.layers.i.self_attn.{q,k,v,o}_proj  -> layers.i.mixer.{wq,wk,wv,wo}   (weight, and q/k/v bias)
    model.layers.i.mlp.{gate,up,down}_proj   -> layers.i.ffn.{w1,w3,w2}
    model.layers.i.input_layernorm           -> layers.i.mixer_norm
    model.layers.i.post_attention_layernorm  -> layers.i.ffn_norm
    model.norm                               -> norm
    lm_head                                  -> output
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from hasten.config import RUN_MODEL_FIELDS, ConfigError, ModelConfig, check_seq_len

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
# RoPE tables are allocated for max_seq_len positions; very long-context models are capped here.
MAX_ROPE_POSITIONS = 16384

_LAYER_MAP = {
    "self_attn.q_proj": "mixer.wq", "self_attn.k_proj": "mixer.wk", "self_attn.v_proj": "mixer.wv",
    "self_attn.o_proj": "mixer.wo", "mlp.gate_proj": "ffn.w1", "mlp.up_proj": "ffn.w3", "mlp.down_proj": "ffn.w2",
    "input_layernorm": "mixer_norm", "post_attention_layernorm": "ffn_norm",
}
_TOP_MAP = {"model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output"}


def is_hf_folder(folder: str | Path) -> bool:
    """A folder holding a Hugging Face config.json (with a model_type) and safetensors weights."""
    folder = Path(folder)
    cfg = folder / "config.json"
    if not cfg.is_file():
        return False
    try:
        meta = json.loads(cfg.read_text())
    except json.JSONDecodeError:
        return False
    return "model_type" in meta and meta.get("format") != "hasten"


def hf_model_config(folder: str | Path, max_seq_len: int | None = None) -> tuple[ModelConfig, int]:
    """(hasten ModelConfig, vocab size) from an HF config.json, or a ConfigError naming what is unsupported."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"{folder} has no config.json; point model.from at a Hugging Face model folder.")
    c: dict[str, Any] = json.loads(path.read_text())
    kind = c.get("model_type", "")
    if kind not in SUPPORTED_TYPES:
        raise ConfigError(f"{folder}: model_type {kind!r} is not supported; hasten loads {', '.join(SUPPORTED_TYPES)} "
                          "(Llama layout) checkpoints.")
    dim, heads = c["hidden_size"], c["num_attention_heads"]
    if c.get("mlp_bias"):
        raise ConfigError(f"{folder}: this {kind} model has biases on its MLP projections (mlp_bias), which "
                          "hasten's decoder does not have.")
    if c.get("attention_bias") and kind != "qwen2":
        raise ConfigError(f"{folder}: attention_bias puts a bias on o_proj as well as q/k/v, and hasten's decoder "
                          "has biases on q/k/v only (Qwen2 layout).")
    if c.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{folder}: hidden_act={c.get('hidden_act')!r} is not supported (SwiGLU with silu only).")
    if c.get("head_dim") not in (None, dim // heads):
        raise ConfigError(f"{folder}: head_dim={c['head_dim']} differs from hidden_size/num_attention_heads; "
                          "hasten's attention needs them equal.")
    scaling = c.get("rope_scaling") or c.get("rope_parameters")  # transformers 5 writes rope_parameters
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise ConfigError(f"{folder}: rope_scaling {scaling} is not supported yet (plain RoPE only).")
    positions = c.get("max_position_embeddings", 4096)
    window = c.get("sliding_window") if c.get("use_sliding_window", kind == "mistral") else None
    seq = max_seq_len or min(positions, MAX_ROPE_POSITIONS)
    if window and window < seq:
        seq = window  # attention within the window equals full attention for sequences this short
    rope_theta = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    vocab = c["vocab_size"]
    cfg = ModelConfig(dim=dim, n_layers=c["num_hidden_layers"], n_heads=heads,
                      n_kv_heads=c.get("num_key_value_heads") or heads, ffn_dim=c["intermediate_size"],
                      vocab_size=vocab, max_seq_len=seq, rope_theta=float(rope_theta),
                      norm_eps=float(c.get("rms_norm_eps", 1e-6)),
                      tie_embeddings=bool(c.get("tie_word_embeddings", False)), dropout=0.0,
                      qkv_bias=kind == "qwen2")  # transformers' Qwen2 always has them, whatever the config says
    return cfg, vocab


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ConfigError(f"{folder} holds no model.safetensors (or model.safetensors.index.json); "
                          "convert .bin weights to safetensors first.")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(str(folder / name)))
    return tensors


def hf_to_hasten_name(name: str) -> str | None:
    """hasten's parameter name for an HF one; None for tensors hasten recomputes (rotary inv_freq)."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    stem, _, leaf = name.rpartition(".")
    if stem in _TOP_MAP:
        return f"{_TOP_MAP[stem]}.{leaf}"
    parts = stem.split(".")
    if len(parts) >= 4 and parts[0] == "model" and parts[1] == "layers":
        sub = ".".join(parts[3:])
        if sub in _LAYER_MAP:
            return f"layers.{parts[2]}.{_LAYER_MAP[sub]}.{leaf}"
    raise ConfigError(f"Unexpected tensor {name!r} in the checkpoint: it has no place in hasten's decoder.")


def load_hf_llama(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  max_seq_len: int | None = None) -> tuple[torch.nn.Module, ModelConfig]:
    """(hasten Decoder in train mode, its ModelConfig) with the weights of an HF Llama-layout folder."""
    from hasten.models import build_model

    folder = Path(folder)
    cfg, vocab = hf_model_config(folder, max_seq_len)
    model = build_model(cfg, vocab, device)
    tensors = _read_safetensors(folder)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        mapped = hf_to_hasten_name(name)
        if mapped is not None:
            state[mapped] = tensor
    if cfg.tie_embeddings:
        state.pop("output.weight", None)
    own = model.state_dict()
    expected = {k for k in own if not (cfg.tie_embeddings and k == "output.weight")}
    missing, extra = sorted(expected - set(state)), sorted(set(state) - set(own))
    if missing:
        raise ConfigError(f"{folder}: the checkpoint lacks {', '.join(missing[:4])}"
                          f"{' ...' if len(missing) > 4 else ''}; is it a complete Llama-layout model?")
    if extra:
        raise ConfigError(f"{folder}: the checkpoint holds {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}, "
                          "which hasten's decoder built from config.json has no place for (a bias it lacks?).")
    for key, tensor in state.items():
        if tuple(own[key].shape) != tuple(tensor.shape):
            raise ConfigError(f"{folder}: {key} has shape {tuple(tensor.shape)}, expected {tuple(own[key].shape)} "
                              "from config.json.")
    with torch.no_grad():
        for key, tensor in state.items():
            own[key].copy_(tensor.to(own[key].dtype))
    return model.to(dtype), cfg


def hf_config_dict(model_cfg: ModelConfig, vocab_size: int, eos_id: int | None = None) -> dict[str, Any]:
    """The config.json of an HF LlamaForCausalLM (Qwen2ForCausalLM with qkv_bias) equal to a dense,
    all-attention hasten Decoder."""
    if set(model_cfg.layer_mixers()) != {"A"} or set(model_cfg.layer_ffns()) != {"D"}:
        raise ConfigError("The Hugging Face Llama format holds attention + dense SwiGLU layers only; this model has "
                          "Mamba-2 or MoE layers: export it with --format hasten.")
    from hasten.models.gpt import ffn_hidden_dim

    out: dict[str, Any] = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=model_cfg.dim,
        intermediate_size=ffn_hidden_dim(model_cfg), num_hidden_layers=model_cfg.n_layers,
        num_attention_heads=model_cfg.n_heads, num_key_value_heads=model_cfg.n_kv_heads or model_cfg.n_heads,
        head_dim=model_cfg.dim // model_cfg.n_heads, vocab_size=vocab_size,
        max_position_embeddings=model_cfg.max_seq_len, rope_theta=model_cfg.rope_theta,
        rms_norm_eps=model_cfg.norm_eps, tie_word_embeddings=model_cfg.tie_embeddings, hidden_act="silu",
        attention_bias=False, mlp_bias=False, attention_dropout=0.0, torch_dtype="float32", dtype="float32",
    )
    if model_cfg.qkv_bias:  # Qwen2: biases on q/k/v only (Llama's attention_bias would add one on o_proj)
        del out["attention_bias"], out["mlp_bias"]
        out.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False,
                   sliding_window=None, max_window_layers=model_cfg.n_layers)
    if eos_id is not None:
        out.update(eos_token_id=eos_id, bos_token_id=eos_id)
    return out


def save_hf_llama(model: torch.nn.Module, out_dir: str | Path, tokenizer: Any = None) -> Path:
    """Write `model` (a plain hasten Decoder, adapters merged) as an HF Llama (or, with qkv_bias, Qwen2) folder."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    inverse_layer = {v: k for k, v in _LAYER_MAP.items()}
    inverse_top = {v: k for k, v in _TOP_MAP.items()}
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if cfg.tie_embeddings and name == "output.weight":
            continue
        stem, _, leaf = name.rpartition(".")
        if stem in inverse_top:
            hf = f"{inverse_top[stem]}.{leaf}"
        else:
            parts = stem.split(".")
            hf = f"model.layers.{parts[1]}.{inverse_layer['.'.join(parts[2:])]}.{leaf}"
        tensors[hf] = tensor.detach().to("cpu", torch.float32).contiguous().clone()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    eos = getattr(tokenizer, "eot_id", None)
    (out / "config.json").write_text(json.dumps(hf_config_dict(cfg, model.vocab_size, eos), indent=1))
    if tokenizer is not None and hasattr(tokenizer, "tok"):  # an HFTokenizer: tokenizer.json at the top level
        tokenizer.tok.save(str(out / "tokenizer.json"))
        eot = tokenizer.tok.id_to_token(tokenizer.eot_id)
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"eos_token": eot, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
    return out


def _pretrained_source(path: Path) -> tuple[str, ModelConfig, int | None, Path]:
    """(kind, model config, vocab size or None, tokenizer folder) of an HF folder or a hasten run/checkpoint/export."""
    if is_hf_folder(path):
        cfg, vocab = hf_model_config(path)
        if not (path / "tokenizer.json").is_file():
            raise ConfigError(f"{path} has no tokenizer.json; hasten reads the tokenizer from the model folder.")
        return "hf", cfg, vocab, path
    from hasten.config import load_config
    from hasten.train.export import EXPORT_CONFIG, _find

    kind, root, _ = _find(path)
    if kind == "export":
        meta = json.loads((root / EXPORT_CONFIG).read_text())
        return "hasten", ModelConfig(**meta["model"]), meta["vocab_size"], root / "tokenizer"
    return "hasten", load_config(root / "config.toml").model, None, root / "tokenizer"


def _existing_source(key: str, value: str) -> Path:
    path = Path(value)
    if not path.exists():
        raise ConfigError(f"{key}={value!r} does not exist; give a Hugging Face model folder or a hasten run, "
                          "checkpoint or export folder.")
    return path


def resolve_pretrained(config: Any) -> Any:
    """The RunConfig with model.from_path's shape in [model] and its tokenizer in data.tokenizer
    (the run folder's config.toml then describes the model the checkpoints hold)."""
    import dataclasses

    if not config.model.from_path:
        return config
    path = _existing_source("model.from", config.model.from_path)
    _, cfg, vocab, tok = _pretrained_source(path)
    model = dataclasses.replace(cfg, from_path=str(path), preset="", vocab_size=vocab or cfg.vocab_size,
                                **{name: getattr(config.model, name) for name in RUN_MODEL_FIELDS})
    data = dataclasses.replace(config.data, tokenizer=str(tok))
    resolved = dataclasses.replace(config, model=model, data=data)
    check_seq_len(resolved)
    return resolved


def resolve_teacher(config: Any) -> Any:
    """The RunConfig with distill.teacher's tokenizer in data.tokenizer, so that student and
    teacher read the same token ids. With model.from too, that model's tokenizer stays (the run
    checks the two vocabularies agree)."""
    import dataclasses

    if not config.distill.teacher:
        return config
    tok = _pretrained_source(_existing_source("distill.teacher", config.distill.teacher))[3]
    if config.model.from_path:
        return config
    return dataclasses.replace(config, data=dataclasses.replace(config.data, tokenizer=str(tok)))


def load_pretrained(model_cfg: ModelConfig, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The Decoder (train mode, fp32) with model_cfg.from_path's weights (adapters of a PEFT run merged)."""
    path = Path(model_cfg.from_path)
    if is_hf_folder(path):
        return load_hf_llama(path, device, max_seq_len=model_cfg.max_seq_len)[0].train()
    from hasten.train.export import load_trained

    return load_trained(path, device)[0].train()


def save_hf_adapter(model: torch.nn.Module, out_dir: str | Path, peft_cfg: Any, base: str) -> Path:
    """Write the LoRA/DoRA adapters of `model` (a hasten Decoder with peft adapters, unmerged) in
    peft's own format: adapter_config.json + adapter_model.safetensors, with Hugging Face module
    names, so that `peft.PeftModel.from_pretrained(hf_model_of(base), out_dir)` applies them."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    inverse_layer = {v: k for k, v in _LAYER_MAP.items()}
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if "lora_" not in name:
            continue
        # layers.3.mixer.wq.lora_A.default.weight -> base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight
        head, _, adapter = name.partition(".lora_")
        _, index, module = head.split(".", 2)
        kind = adapter.split(".")[0]  # A, B or magnitude_vector
        leaf = "lora_magnitude_vector" if kind == "magnitude_vector" else f"lora_{kind}.weight"
        tensors[f"base_model.model.model.layers.{index}.{inverse_layer[module]}.{leaf}"] = \
            tensor.detach().to("cpu", torch.float32).contiguous().clone()
    if not tensors:
        raise ConfigError("This model holds no LoRA/DoRA adapters to export; export it merged instead.")
    targets = sorted({key.split(".")[-2 if key.endswith("vector") else -3] for key in tensors})  # q_proj, ...
    LoraConfig(r=peft_cfg.rank, lora_alpha=peft_cfg.alpha, lora_dropout=peft_cfg.dropout, target_modules=targets,
               use_dora=peft_cfg.method == "dora", bias="none", task_type="CAUSAL_LM",
               base_model_name_or_path=base).save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out

