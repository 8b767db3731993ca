"""PEFT: HF Llama/Qwen2 loading (logit parity with transformers), LoRA/DoRA adapters, merge, HF export, instruct data."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from hasten.config import ConfigError, ModelConfig, PeftConfig, load_config, save_config  # noqa: E402
from hasten.methods import peft  # noqa: E402
from hasten.models.hf import hf_model_config, load_hf_llama, save_hf_llama  # noqa: E402

TEXT = ("def add(a, b):\n    return a + b\n" "The quick brown fox jumps over the lazy dog.\n") * 20


def make_hf_llama(folder, *, tie: bool = False, vocab: int = 300, seed: int = 0, arch: str = "Llama", **extra):
    """A tiny random {arch}ForCausalLM (Llama, or Qwen2 with q/k/v biases) and a byte-level BPE tokenizer
    (tokenizer.json) in `folder`."""
    import tokenizers
    from tokenizers import models, pre_tokenizers, decoders, trainers

    torch.manual_seed(seed)
    cfg = getattr(transformers, f"{arch}Config")(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab, max_position_embeddings=128, rope_theta=5000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie,
        **extra)
    model = getattr(transformers, f"{arch}ForCausalLM")(cfg).eval()
    with torch.no_grad():  # HF's init is tiny (biases zero); larger weights make the parity check meaningful
        for name, p in model.named_parameters():
            if p.dim() == 2 or name.endswith(".bias"):
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


def test_hf_qwen2_logits_match_transformers(tmp_path):
    ref = make_hf_llama(tmp_path, arch="Qwen2", tie=True)
    ours, cfg = load_hf_llama(tmp_path)
    assert cfg.qkv_bias and cfg.tie_embeddings and cfg.rope_theta == 5000.0
    attn = ours.layers[0].mixer
    assert all(lin.bias is not None and lin.bias.abs().sum() > 0 for lin in (attn.wq, attn.wk, attn.wv))
    assert attn.wo.bias is None
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _close(ours.eval()(ids), ref(ids).logits)


def test_qwen2_lora_merge_export_round_trips_through_transformers(tmp_path):
    make_hf_llama(tmp_path / "src", arch="Qwen2")
    model, _ = load_hf_llama(tmp_path / "src")
    model = peft.apply(model, PeftConfig(method="lora", rank=4, alpha=8, targets="all-linear"))
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)  # biases stay frozen
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
        opt.step()
        opt.zero_grad()
    model = peft.merge(model).eval()
    save_hf_llama(model, tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "config.json").read_text())
    assert meta["model_type"] == "qwen2" and "attention_bias" not in meta
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded).__name__ == "Qwen2ForCausalLM"
    again, cfg = load_hf_llama(tmp_path / "out")
    assert cfg.qkv_bias
    with torch.no_grad():
        assert _close(reloaded(ids).logits, model(ids))
        assert torch.equal(again.eval()(ids), model(ids))


@pytest.mark.parametrize("extra, match", [
    (dict(model_type="llama", attention_bias=True), "o_proj"),
    (dict(model_type="llama", mlp_bias=True), "MLP"),
    (dict(model_type="qwen2", mlp_bias=True), "MLP"),
    (dict(model_type="llama", rope_parameters=dict(rope_type="llama3", rope_theta=5e5, factor=8.0)), "rope_scaling"),
    (dict(model_type="gemma"), "not supported"),
])
def test_unsupported_hf_configs_are_refused(tmp_path, extra, match):
    (tmp_path / "config.json").write_text(json.dumps(dict(
        hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128, vocab_size=300, **extra)))
    with pytest.raises(ConfigError, match=match):
        load_hf_llama(tmp_path)


def test_qwen2_sliding_window_caps_the_sequence(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(
        model_type="qwen2", hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
        vocab_size=300, max_position_embeddings=4096, use_sliding_window=True, sliding_window=64)))
    assert hf_model_config(tmp_path)[0].max_seq_len == 64  # within the window, windowed = full attention


def test_hf_checkpoint_with_a_bias_hasten_lacks_is_refused(tmp_path):
    make_hf_llama(tmp_path, arch="Qwen2")
    meta = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**meta, "model_type": "llama"}))
    with pytest.raises(ConfigError, match="no place"):
        load_hf_llama(tmp_path)


def test_qkv_bias_round_trips_and_skips_weight_decay(tmp_path):
    from hasten.models import build_model
    from hasten.optim.builder import param_groups

    cfg = load_config("default", ["model.preset=tiny", "model.qkv_bias=true"])
    save_config(cfg, tmp_path / "config.toml")
    assert load_config(tmp_path / "config.toml").model.qkv_bias
    assert ModelConfig(**json.loads(json.dumps(cfg.to_dict()["model"]))).qkv_bias
    assert not load_config("default").model.qkv_bias
    model = build_model(cfg.model, 256)
    plain = build_model(load_config("default", ["model.preset=tiny"]).model, 256)
    biases = [p for n, p in model.named_parameters() if n.endswith(".bias")]
    assert len(biases) == 3 * cfg.model.n_layers and all(p.abs().sum() == 0 for p in biases)
    assert model.num_params() - plain.num_params() == sum(p.numel() for p in biases)
    assert model.flops_per_token(64) - plain.flops_per_token(64) == 6 * sum(p.numel() for p in biases)
    decay, no_decay = param_groups(model, 0.1)
    assert all(any(p is b for b in no_decay["params"]) for p in biases)
    assert not any(p.ndim < 2 for p in decay["params"])


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


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_lora_inputs_in_the_compute_dtype_keep_less_and_change_nothing(hf_dir, method):
    """Under bf16 autocast over a bf16 base, adapters that take the 16-bit input as it is (no cast to
    their fp32 weights' dtype and back) give the same loss and gradients and keep less for backward.
    DoRA's adapters compute in their input's dtype: they keep the cast."""
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(2))

    def run(keep: bool):
        model, _ = load_hf_llama(hf_dir)
        torch.manual_seed(0)  # the adapters' init
        model = peft.apply(model, PeftConfig(method=method, rank=4, alpha=8, dropout=0.0, targets="all-linear"))
        with torch.no_grad():  # B starts at zero; give it values so the adapters' gradients all flow
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
        peft.cast_frozen(model, torch.bfloat16)
        if keep:
            assert peft.keep_adapter_input_dtype(model) == (14 if method == "lora" else 0)  # 7 linears x 2 blocks
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(ids)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.roll(-1, 1).flatten())
        loss.backward()
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
        kept = sum(n for ptr, n in storages.items() if ptr not in weights)
        return loss.detach(), [p.grad for p in model.parameters() if p.requires_grad], kept

    loss, grads, kept = run(False)
    loss_kept, grads_kept, kept_less = run(True)
    assert loss_kept == loss
    for g, h in zip(grads, grads_kept):
        assert torch.equal(g, h)
    assert kept_less < kept if method == "lora" else kept_less == kept, (kept_less, kept)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lean_dora_matches_peft_dora_and_keeps_less_for_backward(hf_dir, dropout):
    """peft.dora_lean computes peft's DoRA output as c * (base + s * lora) - base, keeping one 16-bit
    tensor of the output's size for backward instead of two: the loss and gradients of peft's own
    layer (fp32; the lean one eager and compiled), and fewer bytes kept under bf16 autocast."""
    import copy

    import torch._dynamo
    from peft.tuners.lora.dora import DoraLinearLayer

    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    model, _ = load_hf_llama(hf_dir)
    torch.manual_seed(0)
    lean = peft.apply(model, PeftConfig(method="dora", rank=4, alpha=8, dropout=dropout, targets="wk,w2",
                                        dora_lean=True))
    with torch.no_grad():  # B starts at zero; values make every gradient flow
        for name, p in lean.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    reference = copy.deepcopy(lean)
    layers = [m for m in reference.modules() if isinstance(m, DoraLinearLayer)]
    assert len(layers) == 4 and all(type(m) is not DoraLinearLayer for m in layers)  # 2 linears x 2 blocks
    for m in layers:
        m.__class__ = DoraLinearLayer  # peft's own forward

    def run(model, autocast: bool, compiled: bool = False):
        saved = []
        torch.manual_seed(5)  # the same dropout masks on both sides
        torch._dynamo.reset()
        forward = torch.compile(model) if compiled else model
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logits = forward(ids)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.roll(-1, 1).flatten())
        loss.backward()
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads, sum(n for ptr, n in storages.items() if ptr not in weights)

    lean.train()
    reference.train()
    loss, grads, _ = run(lean, autocast=False)
    ref_loss, ref_grads, _ = run(reference, autocast=False)
    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert len(grads) == len(ref_grads) == 4 * 3
    for g, h in zip(grads, ref_grads):
        assert torch.allclose(g, h, rtol=1e-4, atol=1e-6)
    if dropout == 0.0:  # compiled against peft's layer eager (masks drawn in a graph differ: no dropout)
        loss, grads, _ = run(lean, autocast=False, compiled=True)
        assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
        for g, h in zip(grads, ref_grads):
            assert torch.allclose(g, h, rtol=1e-4, atol=1e-6)
    for model in (lean, reference):
        peft.cast_frozen(model, torch.bfloat16)
    _, _, kept = run(lean, autocast=True)
    _, _, ref_kept = run(reference, autocast=True)
    outputs = sum(m.base_layer.out_features for m in lean.modules() if hasattr(m, "lora_magnitude_vector"))
    assert outputs == 2 * (32 + 64)
    # at least one bf16 tensor of each adapted linear's output (2 x 24 tokens) fewer
    assert ref_kept - kept >= 2 * 24 * outputs * 2, (kept, ref_kept, outputs)


def test_dora_lean_is_the_default_and_can_be_turned_off(hf_dir):
    from peft.tuners.lora.dora import DoraLinearLayer

    def dora_classes(cfg: PeftConfig) -> set[type]:
        model, _ = load_hf_llama(hf_dir)
        return {type(m) for m in peft.apply(model, cfg).modules() if isinstance(m, DoraLinearLayer)}

    assert PeftConfig(method="dora").dora_lean
    lean = dora_classes(PeftConfig(method="dora", targets="wq"))
    assert len(lean) == 1 and DoraLinearLayer not in lean
    assert dora_classes(PeftConfig(method="dora", targets="wq", dora_lean=False)) == {DoraLinearLayer}


def test_dora_compiles_without_graph_breaks_and_matches_eager(hf_dir):
    """peft's DoRA reads its base weight through a function Dynamo cannot trace; `peft.apply`
    registers what it returns for a plain weight, so the compiled DoRA model is one graph (it
    was one break per adapted linear, and slower than eager) with eager's loss and gradients."""
    import torch._dynamo

    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(2))

    def adapted():
        model, _ = load_hf_llama(hf_dir)
        torch.manual_seed(0)
        model = peft.apply(model, PeftConfig(method="dora", rank=4, alpha=8, dropout=0.0, targets="all-linear"))
        with torch.no_grad():  # B starts at zero; values make the weight norm's gradient flow
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
        return model

    def loss_and_grads(model, forward):
        loss = torch.nn.functional.cross_entropy(forward(ids).flatten(0, 1), ids.roll(-1, 1).flatten())
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]

    model = adapted()
    torch._dynamo.reset()
    assert torch._dynamo.explain(model)(ids).graph_break_count == 0
    eager = adapted()
    loss, grads = loss_and_grads(eager, eager)
    torch._dynamo.reset()
    compiled_loss, compiled_grads = loss_and_grads(model, torch.compile(model))
    assert torch.allclose(compiled_loss, loss, rtol=1e-5, atol=1e-6)
    for g, h in zip(compiled_grads, grads):
        assert torch.allclose(g, h, rtol=1e-4, atol=1e-6)


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


def test_seq_len_is_checked_against_the_pretrained_model_not_the_recipe(tmp_path):
    from hasten.models.hf import resolve_pretrained

    make_hf_llama(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**meta, "max_position_embeddings": 512}))
    config = resolve_pretrained(load_config("default", [f"model.from={tmp_path}", "train.seq_len=384"]))  # recipe: 256
    assert config.model.max_seq_len == 512 and config.train.seq_len == 384
    with pytest.raises(ConfigError, match="train.seq_len=600 is not allowed: it must be <= model.max_seq_len=512"):
        resolve_pretrained(load_config("default", [f"model.from={tmp_path}", "train.seq_len=600"]))
    with pytest.raises(ConfigError, match="model.max_seq_len=256"):  # without model.from, the recipe's shape counts
        load_config("default", ["train.seq_len=384"])


def test_a_run_from_pretrained_weights_keeps_its_own_compute_settings(tmp_path):
    """model.from replaces the shape, but dropout, fp32_residual and the fusing keys say how this run computes: they are the run's own, not the source's (nor silently reset to the defaults)."""
    from hasten.models.hf import resolve_pretrained

    make_hf_llama(tmp_path)
    config = resolve_pretrained(load_config("default", [f"model.from={tmp_path}", "model.fp32_residual=false", "model.dropout=0.1",
                                                        "model.fuse_projections=true", "model.fuse_norms=true", "model.dim=8",
                                                        "train.seq_len=64"]))
    meta = json.loads((tmp_path / "config.json").read_text())
    assert config.model.dim == meta["hidden_size"] != 8  # the shape is the source's
    assert (config.model.fp32_residual, config.model.dropout, config.model.fuse_projections,
            config.model.fuse_norms) == (False, 0.1, True, True)
