"""`hasten finetune` end to end: tiny HF Llama -> LoRA on instruction data (CLI) -> merged HF export -> transformers."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from tests.conftest import run_hasten as hasten  # noqa: E402
from tests.unit.test_peft import _close, make_hf_llama  # noqa: E402

QUICK = ["train.steps=6", "train.seq_len=48", "train.batch_size=4", "train.eval_every=0", "train.eval_batches=1",
         "log.progress=false", "log.tensorboard=false", "log.plot=false", "optim.lr=1e-2", "optim.warmup_steps=0",
         "train.threads=1"]


def write_instruct(path, n=40):
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Q: add {i} and {i + 1}?\nA: ", "response": f"{2 * i + 1}"}) + "\n")
    return path


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_finetune_cli_merged_hf_export(tmp_path, env, method):
    from hasten.models.hf import load_hf_llama
    from hasten.train.export import load_trained

    hf = tmp_path / "hf"
    base = make_hf_llama(hf)
    data = write_instruct(tmp_path / "qa.jsonl")
    run = tmp_path / "run"
    hasten("finetune", f"model.from={hf}", f"data.source={data}", f"train.out_dir={run}", f"peft.method={method}",
           *QUICK, env=env)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["completed"] and summary["steps"] == 6 and summary["peft"] == method
    assert 0 < summary["trainable_params"] < summary["total_params"] / 5

    merged, _, cfg = load_trained(run)  # adapters merged into the base
    assert cfg.from_path == str(hf) and cfg.dim == 64
    original, _ = load_hf_llama(hf)
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert _close(original.eval()(ids), base(ids).logits)  # loaded = transformers' own
        assert not _close(merged(ids), original(ids))  # the adapters learned something

    out = tmp_path / "export-hf"
    hasten("export", str(run), "--merge", "--format", "hf", "--out", str(out), env=env)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert _close(reloaded(ids).logits, merged(ids))
    assert (out / "tokenizer.json").is_file()


def test_dora_finetune_in_process_and_hasten_export(tmp_path, monkeypatch):
    from hasten.api import export, train
    from hasten.config import load_config
    from hasten.train.export import load_trained

    monkeypatch.setenv("HASTEN_CACHE", str(tmp_path / "cache"))
    hf = tmp_path / "hf"
    make_hf_llama(hf, tie=True)
    data = write_instruct(tmp_path / "qa.jsonl")
    run = tmp_path / "run"
    config = load_config("default", [f"model.from={hf}", f"data.source={data}", f"train.out_dir={run}",
                                     "peft.method=dora", "peft.targets=attention", "peft.rank=4",
                                     "log.sample_tokens=0", "checkpoint.every=0", *QUICK])
    summary = train(config)
    assert summary["completed"] and summary["peft"] == "dora" and summary["trainable_params"] < 5000
    merged, _, _ = load_trained(run)
    exported, _, _ = load_trained(export(run))  # hasten format, merged
    ids = torch.arange(1, 40)[None]
    with torch.no_grad():
        assert torch.equal(exported(ids), merged(ids))


def test_a_bf16_lora_run_samples_at_its_end(tmp_path, monkeypatch):
    """bf16 LoRA: the frozen base in bf16, the adapters' inputs left in bf16; the end-of-run sample
    runs under the run's autocast like the training steps, so the fp32 adapters meet bf16 inputs."""
    from hasten.api import train
    from hasten.config import load_config

    monkeypatch.setenv("HASTEN_CACHE", str(tmp_path / "cache"))
    hf = tmp_path / "hf"
    make_hf_llama(hf)
    data = write_instruct(tmp_path / "qa.jsonl")
    config = load_config("default", [f"model.from={hf}", f"data.source={data}", f"train.out_dir={tmp_path / 'run'}",
                                     "peft.method=lora", "precision.dtype=bf16", "log.sample_tokens=8",
                                     "checkpoint.every=0", *QUICK, "train.steps=2"])
    summary = train(config)
    assert summary["completed"] and summary["precision"] == "bf16" and isinstance(summary["sample"], str)


def test_lora_run_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    from hasten.api import train
    from hasten.config import load_config

    monkeypatch.setenv("HASTEN_CACHE", str(tmp_path / "cache"))
    hf = tmp_path / "hf"
    make_hf_llama(hf)
    data = write_instruct(tmp_path / "qa.jsonl")
    common = [f"model.from={hf}", f"data.source={data}", f"train.out_dir={tmp_path / 'run'}", "peft.method=lora",
              "log.sample_tokens=0", "checkpoint.every=3", "log.every=1", *QUICK]
    full = train(load_config("default", common))
    mid = tmp_path / "run" / "checkpoints" / "step_0000003"
    assert mid.is_dir()
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(str(mid)).read_metadata().state_dict_metadata
    model_keys = [k for k in saved if k.startswith("model.")]
    assert model_keys and all("lora_" in k for k in model_keys)  # adapter-only: the frozen base is not saved
    resumed = train(load_config("default", common + [f"train.resume={mid}"]))
    assert resumed["steps"] == 6 and abs(resumed["final_loss"] - full["final_loss"]) < 1e-5


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_messages_records_train_on_the_assistant_reply_through_the_chat_template(tmp_path, monkeypatch):
    from hasten.api import train
    from hasten.config import ConfigError, load_config
    from hasten.data.instruct import ChatTemplate, load_records
    from hasten.train.log import read_log

    monkeypatch.setenv("HASTEN_CACHE", str(tmp_path / "cache"))
    hf = tmp_path / "hf"
    make_hf_llama(hf)
    data = tmp_path / "chat.jsonl"
    with data.open("w") as f:
        for i in range(40):
            f.write(json.dumps({"messages": [{"role": "system", "content": "You add."},
                                             {"role": "user", "content": f"{i} + {i + 1}?"},
                                             {"role": "assistant", "content": f"{2 * i + 1}"}]}) + "\n")
    with pytest.raises(ConfigError, match="has none"):  # the fixture's tokenizer has no template yet
        load_records(str(data), hf)
    config_path = hf / "tokenizer_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "chat_template": CHAT_TEMPLATE}))
    prompt, response = load_records(str(data), hf)[3]
    assert prompt == "<|system|>You add.\n<|user|>3 + 4?\n<|assistant|>" and response == "7\n"
    with pytest.raises(ValueError, match="last message must be the assistant's"):
        ChatTemplate(hf)([{"role": "user", "content": "hi"}])
    run = tmp_path / "run"
    summary = train(load_config("default", [f"model.from={hf}", f"data.source={data}", f"train.out_dir={run}",
                                            "peft.method=lora", "log.sample_tokens=0", "checkpoint.every=0",
                                            "log.every=1", *QUICK]))
    losses = [r["loss"] for r in read_log(run / "metrics.jsonl") if r["event"] == "train"]
    assert summary["completed"] and losses[-1] < losses[0]


@pytest.mark.parametrize("extra,rel", [
    (["parallel.activation_checkpointing=full"], 1e-5),
    (["parallel.activation_checkpointing=ops", "parallel.activation_checkpoint_fraction=0.5"], 1e-5),
    (["train.compile=true", "parallel.activation_checkpointing=budget", "parallel.activation_memory_budget=0.3"], 1e-3),
    (["train.compile=true", "parallel.activation_checkpointing=ops"], 1e-3),  # compiled: fused kernels, other sums
], ids=["full", "ops-half", "budget-compiled", "ops-compiled"])
def test_lora_with_activation_checkpointing_trains_like_plain_lora(tmp_path, monkeypatch, extra, rel):
    from hasten.api import train
    from hasten.config import load_config
    from hasten.train.log import read_log

    monkeypatch.setenv("HASTEN_CACHE", str(tmp_path / "cache"))
    hf = tmp_path / "hf"
    make_hf_llama(hf)
    data = write_instruct(tmp_path / "qa.jsonl")

    def losses(name, *extra):
        train(load_config("default", [f"model.from={hf}", f"data.source={data}", f"train.out_dir={tmp_path / name}",
                                      "peft.method=lora", "log.sample_tokens=0", "checkpoint.every=0", "log.every=1",
                                      "precision.dtype=fp32", *QUICK, *extra]))  # fp32 on a GPU too: the tolerances
        return [r["loss"] for r in read_log(tmp_path / name / "metrics.jsonl") if r["event"] == "train"]

    assert losses("checkpointed", *extra) == pytest.approx(losses("plain"), rel=rel)


def _finetuned(tmp_path, monkeypatch, method: str):
    """(HF base folder, run folder) of a short in-process fine-tune of a tiny HF Llama."""
    from hasten.api import train
    from hasten.config import load_config

    monkeypatch.setenv("HASTEN_CACHE", str(tmp_path / "cache"))
    hf, run = tmp_path / "hf", tmp_path / "run"
    make_hf_llama(hf)
    data = write_instruct(tmp_path / "qa.jsonl")
    train(load_config("default", [f"model.from={hf}", f"data.source={data}", f"train.out_dir={run}",
                                  f"peft.method={method}", "log.sample_tokens=0", *QUICK]))
    return hf, run


def test_a_qlora_checkpoint_merges_into_the_full_precision_base(tmp_path, monkeypatch):
    """QLoRA trains on CUDA only, but its checkpoint holds adapters named as LoRA's: export merges them
    into model.from's full-precision weights on any device. A LoRA run relabelled qlora stands in."""
    from hasten.config import load_config, save_config
    from hasten.train.export import load_trained

    _, run = _finetuned(tmp_path, monkeypatch, "lora")
    lora_merged = load_trained(run)[0]
    config = load_config(run / "config.toml")
    save_config(dataclasses.replace(config, peft=dataclasses.replace(config.peft, method="qlora")), run / "config.toml")
    qlora_merged = load_trained(run)[0]
    ids = torch.arange(1, 40)[None]
    with torch.no_grad():
        assert torch.equal(qlora_merged(ids), lora_merged(ids))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapter_only_export_loads_with_peft_on_the_transformers_model(tmp_path, monkeypatch, method):
    """`hasten export RUN --format hf --adapter-only`: peft's PeftModel.from_pretrained on the HF base
    gives the logits of hasten's merged model."""
    from peft import PeftModel

    from hasten.api import export
    from hasten.config import ConfigError
    from hasten.train.export import load_trained

    hf, run = _finetuned(tmp_path, monkeypatch, method)
    adapter = export(run, tmp_path / "adapter", merge=False, format="hf")
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    with pytest.raises(ConfigError, match="peft's format"):
        export(run, tmp_path / "no", merge=False, format="hasten")
    base = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    ids = torch.arange(1, 40)[None]
    with torch.no_grad():
        before = base(ids).logits
        theirs = PeftModel.from_pretrained(base, adapter).eval()  # wraps `base` in place
        want = load_trained(run)[0](ids)
        assert not _close(before, want)  # the adapters changed the model
        assert _close(theirs(ids).logits, want)
