"""Unit tests of hasten.models on tiny CPU models (dim 64, 2 layers, vocab 256)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hasten.config import MODEL_PRESETS, ConfigError, ModelConfig
from tests.saved import kept_for_backward, nbytes

from hasten.models import (Attention, Decoder, RMSNorm, SwiGLU, apply_rope, build_model, generate,
                           resolve_vocab_size, rope_tables)

V = 256


def tiny(**overrides) -> ModelConfig:
    fields = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32) | overrides
    return ModelConfig(**fields)


def tiny_model(seed: int = 0, **overrides) -> Decoder:
    torch.manual_seed(seed)
    return build_model(tiny(**overrides), V, "cpu")


def batch(B: int = 2, T: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- layers


def test_rmsnorm_matches_formula():
    x = torch.randn(2, 5, 64)
    norm = RMSNorm(64, eps=1e-5)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(norm(x), expected)
    assert norm.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16  # computes in the input dtype


def test_rope_preserves_norm_and_dtype():
    cos, sin = rope_tables(16, 32, 10000.0)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (32, 16)
    x = torch.randn(2, 3, 32, 16)
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))
    assert apply_rope(x.bfloat16(), cos, sin).dtype == torch.bfloat16


def test_rope_scores_depend_only_on_relative_position():
    d, T = 16, 32
    cos, sin = rope_tables(d, T, 10000.0)
    q, k = torch.randn(d), torch.randn(d)
    # place the same q and k at every position; score(i, j) must be a function of i - j only
    q_rot = apply_rope(q.expand(1, 1, T, d), cos, sin)[0, 0]
    k_rot = apply_rope(k.expand(1, 1, T, d), cos, sin)[0, 0]
    scores = q_rot @ k_rot.T
    for offset in (0, 3, 7):
        diagonal = torch.diagonal(scores, offset=-offset)
        torch.testing.assert_close(diagonal, diagonal[0].expand_as(diagonal), atol=1e-4, rtol=1e-4)
    # and rotation is not the identity: scores do change with the offset
    assert not torch.allclose(scores[5, 5], scores[5, 0])


def test_rope_matches_hf_llama_rotate_half():
    d, T = 8, 5
    cos, sin = rope_tables(d, T, 500.0)
    inv_freq = 1.0 / (500.0 ** (torch.arange(0, d, 2).float() / d))
    angle = 4 * inv_freq  # position 4
    x = torch.randn(d)
    x1, x2 = x[: d // 2], x[d // 2:]
    expected = torch.cat((x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()))
    torch.testing.assert_close(apply_rope(x.expand(1, 1, T, d), cos, sin)[0, 0, 4], expected)


def test_swiglu_shape_and_names():
    ffn = SwiGLU(64, 192)
    assert ffn(torch.randn(2, 3, 64)).shape == (2, 3, 64)
    assert {n for n, _ in ffn.named_parameters()} == {"w1.weight", "w2.weight", "w3.weight"}


# ---------------------------------------------------------------- attention


def test_gqa_equals_mha_with_repeated_kv_heads():
    torch.manual_seed(0)
    dim, H, K, T = 64, 4, 2, 12
    d = dim // H
    gqa, mha = Attention(dim, H, K), Attention(dim, H, H)
    with torch.no_grad():
        mha.wq.weight.copy_(gqa.wq.weight)
        mha.wo.weight.copy_(gqa.wo.weight)
        for name in ("wk", "wv"):  # kv head j serves query heads j*H/K .. (j+1)*H/K - 1
            w = getattr(gqa, name).weight.view(K, d, dim).repeat_interleave(H // K, dim=0)
            getattr(mha, name).weight.copy_(w.reshape(H * d, dim))
    x = torch.randn(2, T, dim)
    rope = rope_tables(d, T, 10000.0)
    torch.testing.assert_close(gqa(x, rope=rope), mha(x, rope=rope), atol=1e-5, rtol=1e-5)


def test_gqa_fallback_path_matches(monkeypatch):
    import hasten.models.attention as attention
    torch.manual_seed(0)
    attn = Attention(64, 4, 2)
    x, rope = torch.randn(1, 8, 64), rope_tables(16, 8, 10000.0)
    native = attn(x, rope=rope)
    monkeypatch.setattr(attention, "SDPA_HAS_GQA", False)
    torch.testing.assert_close(attn(x, rope=rope), native, atol=1e-5, rtol=1e-5)


def test_attention_dropout_only_in_training():
    torch.manual_seed(0)
    attn = Attention(64, 4, 4, dropout=0.5)
    x, rope = torch.randn(1, 8, 64), rope_tables(16, 8, 10000.0)
    attn.eval()
    torch.testing.assert_close(attn(x, rope=rope), attn(x, rope=rope))
    attn.train()
    assert not torch.allclose(attn(x, rope=rope), attn(x, rope=rope))


# ---------------------------------------------------------------- decoder


def test_output_shape():
    model = tiny_model()
    assert model(batch(3, 10)).shape == (3, 10, V)


def test_causality():
    model = tiny_model().eval()
    idx = batch(1, 16)
    changed = idx.clone()
    changed[0, 10] = (changed[0, 10] + 1) % V
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_too_long_sequence_is_an_error():
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny_model()(batch(1, 33))


def test_tied_and_untied_embeddings():
    tied = tiny_model(tie_embeddings=True)
    assert tied.output.weight is tied.tok_embeddings.weight
    assert tied.output.weight.data_ptr() == tied.tok_embeddings.weight.data_ptr()
    untied = tiny_model(tie_embeddings=False)
    assert untied.output.weight.data_ptr() != untied.tok_embeddings.weight.data_ptr()
    assert untied.num_params() - tied.num_params() == V * 64


def test_gpt2_124m_param_count():
    cfg = ModelConfig(**MODEL_PRESETS["gpt2-124m"])
    with torch.device("meta"):
        model = Decoder(cfg, 50304)
    assert abs(model.num_params() - 124e6) < 3e6, model.num_params()
    assert model.num_params(exclude_embedding=True) == model.num_params() - 50304 * 768


def test_ffn_dim_auto_rounding():
    model = tiny_model()  # 8*64/3 = 170.67 -> 170 -> 192
    assert model.layers[0].ffn.w1.weight.shape == (192, 64)
    assert tiny_model(ffn_dim=100).layers[0].ffn.w1.weight.shape == (100, 64)
    assert tiny_model(ffn_multiple_of=32).layers[0].ffn.w1.weight.shape == (192, 64)
    assert tiny_model(ffn_multiple_of=100).layers[0].ffn.w1.weight.shape == (200, 64)


def test_meta_build_is_deterministic_and_materialized():
    a, b = tiny_model(seed=3), tiny_model(seed=3)
    for (name, ta), tb in zip(list(a.named_parameters()) + list(a.named_buffers()),
                              list(b.parameters()) + list(b.buffers())):
        assert not ta.is_meta, name
        torch.testing.assert_close(ta, tb, msg=name)
    cos, sin = rope_tables(16, 32, 10000.0)
    torch.testing.assert_close(a.rope_cos, cos)
    torch.testing.assert_close(a.rope_sin, sin)
    assert not torch.equal(a.layers[0].mixer.wq.weight, tiny_model(seed=4).layers[0].mixer.wq.weight)
    assert "rope_cos" not in a.state_dict()


def test_init_std_is_scaled_for_residual_projections():
    torch.manual_seed(0)
    cfg = ModelConfig(dim=256, n_layers=8, n_heads=4, max_seq_len=16, init_std=0.02)
    model = build_model(cfg, 512)
    scaled = 0.02 / math.sqrt(2 * 8)
    block = model.layers[3]
    for w, std in ((block.mixer.wq.weight, 0.02), (block.ffn.w1.weight, 0.02), (model.tok_embeddings.weight, 0.02),
                   (block.mixer.wo.weight, scaled), (block.ffn.w2.weight, scaled)):
        assert w.std().item() == pytest.approx(std, rel=0.05)
    assert torch.all(block.mixer_norm.weight == 1) and torch.all(model.norm.weight == 1)


def test_flops_per_token():
    model = tiny_model()
    assert model.flops_per_token(32) == 6 * model.num_params() + 12 * 2 * 64 * 32


def test_resolve_vocab_size():
    assert resolve_vocab_size(tiny(), 4000) == 4032
    assert resolve_vocab_size(tiny(), 4096) == 4096
    assert resolve_vocab_size(tiny(vocab_size=5000), 4000) == 5000
    with pytest.raises(ConfigError):
        resolve_vocab_size(tiny(vocab_size=100), 4000)


def test_adamw_lowers_loss_on_fixed_batch():
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = batch(4, 17)
    inputs, targets = idx[:, :-1], idx[:, 1:]
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(V), rel=0.1)  # small init: near-uniform predictions
    assert losses[-1] < losses[0] - 0.5


def test_dropout_config_reaches_the_model():
    model = tiny_model(dropout=0.3)
    assert model.layers[0].mixer.dropout == 0.3 and model.layers[0].dropout.p == 0.3
    model.train()
    idx = batch(1, 8)
    assert not torch.allclose(model(idx), model(idx))
    model.eval()
    torch.testing.assert_close(model(idx), model(idx))


def test_bf16_autocast():
    model = tiny_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(batch(2, 16))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    logits.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def _stream(model: Decoder, idx: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Under bf16 autocast, after backward: the stream entering each block (the first tensor
    argument, its gradient kept), and the stream entering the final norm."""
    entering, final = [], []

    def keep(_, args):
        args[0].retain_grad()
        entering.append(args[0])

    hooks = [m.register_forward_pre_hook(keep) for m in model.layers]
    hooks.append(model.norm.register_forward_pre_hook(lambda _, args: final.append(args[0].detach().clone())))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx).float().pow(2).mean().backward()
    for h in hooks:
        h.remove()
    return entering, final[0]


def _residual_dtypes(model: Decoder, idx: torch.Tensor) -> set[torch.dtype]:
    """The dtypes of the residual stream entering each block and the final norm, under bf16 autocast."""
    entering, final = _stream(model, idx)
    return {t.dtype for t in [*entering, final]}


def test_bf16_residual_stream_option():
    """model.fp32_residual=false: the residual stream is bf16 under bf16 autocast (fp32 by default),
    the fp32 master weights still get fp32 gradients, and the loss stays close; without autocast
    the option changes nothing."""
    idx = batch(2, 16)
    assert _residual_dtypes(tiny_model(), idx) == {torch.float32}
    model = tiny_model(fp32_residual=False)
    assert _residual_dtypes(model, idx) == {torch.bfloat16}
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = F.cross_entropy(model(idx[:, :-1]).float().flatten(0, 1), idx[:, 1:].flatten())
        high = F.cross_entropy(tiny_model()(idx[:, :-1]).float().flatten(0, 1), idx[:, 1:].flatten())
    torch.testing.assert_close(low, high, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(model(idx), tiny_model()(idx))


def test_bf16_residual_stream_keeps_no_fp32_activations_compiled():
    """Compiled, the fp32 residual stream is most of what a bf16-autocast model keeps in fp32 for
    backward; with model.fp32_residual=false only the norms' per-token statistics remain."""
    def kept(fp32_residual: bool) -> tuple[int, int]:
        model = tiny_model(fp32_residual=fp32_residual, n_layers=1)

        def loss_fn(idx):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return F.cross_entropy(model(idx[:, :-1]).float().flatten(0, 1), idx[:, 1:].flatten())

        acts, _ = kept_for_backward(loss_fn, model.parameters(), batch(2, 33))
        return nbytes(acts), nbytes(t for t in acts if t.dtype == torch.float32)

    (total, fp32), (total_bf16, fp32_bf16) = kept(True), kept(False)
    assert fp32_bf16 < 0.2 * fp32 and total_bf16 < total, (total, fp32, total_bf16, fp32_bf16)


def test_split_stream_keeps_sixteen_bits():
    from hasten.models.gpt import join_stream, split_stream

    x = torch.randn(4096) * torch.logspace(-3, 3, 4096)
    hi, lo = split_stream(x)
    assert hi.dtype == lo.dtype == torch.bfloat16
    assert ((join_stream(hi, lo) - x).abs() <= x.abs() * 2.0**-16).all()
    assert ((hi.float() - x).abs() > x.abs() * 2.0**-12).any()  # bf16 alone is far coarser


def test_split_residual_stream_is_fp32_forward_and_bf16_backward():
    """model.split_residual: the fp32 stream stored as a bf16 pair. Forward, the stream ends closer
    to the fp32 one than the bf16 stream does (both differ from it also through the bf16 roundings
    of the branches' inputs, which any change of the stream shifts); backward, the gradient entering
    each block is bf16, and the weights' gradients stay close to the fp32 stream's."""
    idx = batch(2, 32)
    ref_model, split_model, bf16_model = (tiny_model(), tiny_model(split_residual=True),
                                          tiny_model(fp32_residual=False))
    (ref_in, ref), (split_in, split), (_, low) = (_stream(m, idx) for m in (ref_model, split_model, bf16_model))
    ref_grads, split_grads = [t.grad for t in ref_in], [t.grad for t in split_in]
    err = ((split.float() - ref).norm() / ref.norm()).item()
    err_bf16 = ((low.float() - ref).norm() / ref.norm()).item()
    assert split.dtype == torch.float32 and err < err_bf16 / 2, (err, err_bf16)
    assert {g.dtype for g in ref_grads} == {torch.float32}
    assert {g.dtype for g in split_grads} == {torch.bfloat16}
    for p, q in zip(ref_model.parameters(), split_model.parameters()):
        assert q.grad.dtype == torch.float32
        torch.testing.assert_close(q.grad, p.grad, rtol=0.05, atol=0.05 * p.grad.abs().max().item())
    # no autocast, or fp16 autocast: the option changes nothing
    torch.testing.assert_close(split_model(idx), ref_model(idx), rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.float16):
        torch.testing.assert_close(split_model(idx), ref_model(idx), rtol=0, atol=0)


def test_compiled_split_stream_keeps_the_remainder():
    """Compiled, the pair is eager's bit for bit: the compiler may not fold the bf16 rounding of `hi`
    away inside its kernel (which made `lo` 0, and the stream a bf16 one)."""
    from hasten.models.gpt import join_stream, split_stream

    def residual_point(hi, lo, branch):
        return split_stream(join_stream(hi, lo) + branch.float())

    torch.manual_seed(0)
    hi, lo = split_stream(torch.randn(64, 96) * 3)
    branch = torch.randn(64, 96).bfloat16()
    eager = residual_point(hi, lo, branch)
    try:
        compiled = torch.compile(residual_point)(hi, lo, branch)
    except Exception as err:  # no C compiler or an unsupported platform: not this package's bug
        pytest.skip(f"torch.compile unavailable here: {type(err).__name__}: {err}")
    assert eager[1].abs().max() > 0
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1])


def test_split_residual_stream_compiles():
    model = tiny_model(n_layers=1, split_residual=True)
    idx = batch(2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = model(idx).float()
        try:
            compiled = torch.compile(model)(idx).float()
        except Exception as err:  # no C compiler or an unsupported platform: not this package's bug
            pytest.skip(f"torch.compile unavailable here: {type(err).__name__}: {err}")
    torch.testing.assert_close(compiled, eager, atol=2e-2, rtol=2e-2)
    compiled.pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_torch_compile_forward_backward():
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile unavailable")
    model = tiny_model(n_layers=1)
    try:
        compiled = torch.compile(model)
        logits = compiled(batch(2, 16))
    except Exception as err:  # no C compiler or an unsupported platform: not this package's bug
        pytest.skip(f"torch.compile unavailable here: {type(err).__name__}: {err}")
    torch.testing.assert_close(logits, model(batch(2, 16)), atol=1e-4, rtol=1e-4)
    logits.float().pow(2).mean().backward()
    assert model.tok_embeddings.weight.grad is not None


# ---------------------------------------------------------------- generate


def test_generate_deterministic_and_lengths():
    model = tiny_model()
    prompt = [1, 2, 3]
    out = generate(model, prompt, 10, temperature=1.0, top_k=20, seed=7)
    assert len(out) == 13 and out[:3] == prompt and all(0 <= t < V for t in out)
    assert out == generate(model, prompt, 10, temperature=1.0, top_k=20, seed=7)
    others = {tuple(generate(model, prompt, 10, temperature=1.0, top_k=None, seed=s)) for s in range(4)}
    assert len(others) > 1


def test_generate_greedy_with_temperature_zero():
    model = tiny_model()
    prompt = [5, 6]
    out = generate(model, prompt, 6, temperature=0.0, seed=1)
    assert out == generate(model, prompt, 6, temperature=0.0, seed=2)
    idx = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(6):
            idx = torch.cat((idx, model(idx)[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert out == idx[0].tolist()


def test_generate_long_prompt_and_mode_restored():
    model = tiny_model()  # max_seq_len 32
    model.train()
    prompt = list(range(50))
    out = generate(model, prompt, 5, temperature=0.0)
    assert out[:50] == prompt and len(out) == 55
    assert model.training
    # cropping: only the last 32 tokens matter
    assert out[50:] == generate(model, prompt[-32:], 5, temperature=0.0)[32:]
