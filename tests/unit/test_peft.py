"""PEFT: HF Llama loading (logit parity with transformers), LoRA/DoRA adapters, merge, HF export, instruct data."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from hasten.config import ConfigError, PeftConfig, load_config  # noqa: E402
from hasten.methods import peft  # noqa: E402
from hasten.models.hf import load_hf_llama, save_hf_llama  # noqa: E402

TEXT = ("def add(a, b):\n    return a + b\n" "The quick brown fox jumps over the lazy dog.\n") * 20


def make_hf_llama(folder, *, tie: bool = False, vocab: int = 300, seed: int = 0, **extra):
    """A tiny random LlamaForCausalLM and a byte-level BPE tokenizer (tokenizer.json) in `folder`."""
    import tokenizers
    from tokenizers import models, pre_tokenizers, decoders, trainers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128,
                                   rope_theta=5000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie, **extra)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF's init is tiny; larger weights make the parity check meaningful
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    model.save_pretrained(folder)
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab - 4, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    make_hf_llama(folder)
    return folder


def _close(a, b, rtol=1e-4):
    return (a - b).abs().max().item() <= rtol * max(a.abs().max().item(), 1e-6)


@pytest.mark.parametrize("tie", [False, True])
def test_hf_llama_logits_match_transformers(tmp_path, tie):
    ref = make_hf_llama(tmp_path, tie=tie)
    ours, cfg = load_hf_llama(tmp_path)
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim) == (64, 2, 4, 2, 160)
    assert cfg.rope_theta == 5000.0 and cfg.norm_eps == 1e-6 and cfg.tie_embeddings == tie
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _close(ours.eval()(ids), ref(ids).logits)


def test_sharded_checkpoint_loads(tmp_path):
    ref = make_hf_llama(tmp_path / "src")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ours, _ = load_hf_llama(tmp_path / "sharded")
    ids = torch.arange(20)[None]
    with torch.no_grad():
        assert _close(ours.eval()(ids), ref(ids).logits)


def test_biased_qwen2_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(
        model_type="qwen2", hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
        vocab_size=300)))
    with pytest.raises(ConfigError, match="biases"):
        load_hf_llama(tmp_path)


def test_peft_config_targets_and_alias():
    assert PeftConfig(targets="attention").target_names() == ["wq", "wk", "wv", "wo"]
    assert PeftConfig(targets="wq, w2").target_names() == ["wq", "w2"]
    with pytest.raises(ConfigError, match="peft.targets"):
        PeftConfig(targets="q_proj")
    assert load_config("default", ["model.from=/x"]).model.from_path == "/x"


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapters_train_only_adapters_and_merge_exactly(hf_dir, method):
    model, _ = load_hf_llama(hf_dir)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = model.eval()(ids)
    model = peft.apply(model, PeftConfig(method=method, rank=4, alpha=8, targets="all-linear"))
    trainable, total = peft.param_counts(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names) and 0 < trainable < total / 5
    assert any("magnitude" in n for n in names) == (method == "dora")
    with torch.no_grad():
        assert _close(model(ids), base)  # B starts at zero: the adapted model equals the base
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.roll(-1, 1).flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        tuned = model(ids)
        assert not _close(tuned, base)
        merged = peft.merge(model)
        assert not peft.is_peft(merged)
        assert _close(merged(ids), tuned)


def test_qlora_on_cpu_fails_in_one_sentence(hf_dir):
    model, _ = load_hf_llama(hf_dir)
    with pytest.raises(ConfigError, match="qlora needs a CUDA GPU"):
        peft.apply(model, PeftConfig(method="qlora"))


def test_hf_export_round_trips_through_transformers(hf_dir, tmp_path):
    model, _ = load_hf_llama(hf_dir)
    model = peft.apply(model, PeftConfig(method="lora", rank=4))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model = peft.merge(model).eval()
    save_hf_llama(model, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 300, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert _close(reloaded(ids).logits, model(ids))


def test_instruct_labels_mask_the_prompt():
    from hasten.data import ByteTokenizer
    from hasten.data.instruct import IGNORE_INDEX, InstructBatches, encode_example

    tok = ByteTokenizer()
    x, y = encode_example(tok, "Q:", "ab", seq_len=16)
    assert x == [ord("Q"), ord(":"), ord("a"), ord("b")]
    assert y == [IGNORE_INDEX, ord("a"), ord("b"), tok.eot_id]
    batches = InstructBatches([("Q:", "ab"), ("long prompt", "xyz")], tok, seq_len=16, batch_size=2, seed=0)
    xb, yb = batches.batch(0, 0)
    assert xb.shape == yb.shape == (2, 16)
    assert (yb != IGNORE_INDEX).sum(1).sort().values.tolist() == [3, 4]  # response + eot only; padding ignored
    assert torch.equal(batches.batch(5, 1)[0], batches.batch(5, 1)[0])  # stateless: same step, same batch
