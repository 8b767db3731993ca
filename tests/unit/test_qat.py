"""Quantization-aware training: torchao's fake-quantized linears in the blocks, a quantized model
after, and post-training quantization as the baseline."""

from __future__ import annotations

import json

import pytest
import torch

import hasten
from hasten.config import ConfigError, QatConfig, load_config
from hasten.train.build import build_run
from hasten.train.metrics import parameter_bytes
from tests.unit.test_models import batch, tiny_model

pytest.importorskip("torchao")

from hasten.methods import qat

INT4 = QatConfig(scheme="int4w", group_size=32)
INT8DA = QatConfig(scheme="int8da-int4w", group_size=32)


def test_prepare_fake_quantizes_the_block_linears_only_and_keeps_the_parameter_names():
    model = tiny_model()
    names, keys = qat.quantized_linears(model, 32), set(model.state_dict())
    qat.prepare(model, INT8DA)
    fake = {n for n, m in model.named_modules() if type(m).__name__ == "FakeQuantizedLinear"}
    assert fake == set(names) and fake and not any(n in ("output", "tok_embeddings") for n in fake)
    assert set(model.state_dict()) == keys  # checkpoints and resume see float weights under the same names


def test_fake_quantization_changes_the_forward_and_passes_gradients_straight_through():
    model, float_model = tiny_model(), tiny_model()
    qat.prepare(model, INT4)
    idx = batch(2, 16)
    logits = model(idx)
    assert not torch.allclose(logits, float_model(idx), atol=1e-4)
    torch.testing.assert_close(logits, float_model(idx), atol=0.5, rtol=0)  # close: the same weights, rounded
    logits.float().pow(2).mean().backward()
    grads = [m.weight.grad for m in model.modules() if type(m).__name__ == "FakeQuantizedLinear"]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("cfg", [INT4, INT8DA, QatConfig(scheme="int4w", group_size=0),
                                 QatConfig(scheme="int8w", group_size=0),
                                 QatConfig(scheme="int8da-int8w", group_size=32)],
                         ids=["int4w", "int8da-int4w", "int4w-per-row", "int8w-per-row", "int8da-int8w"])
def test_convert_gives_the_fake_quantized_forward_with_real_integer_weights(cfg):
    model = tiny_model()
    qat.prepare(model, cfg)
    idx = batch(2, 16)
    with torch.no_grad():
        fake = model(idx)
        reference = model.layers[0].mixer.wq.weight.detach().clone()
    qat.convert(model, cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), fake, atol=1e-5, rtol=1e-5)
    weight = model.layers[0].mixer.wq.weight
    q, scale = weight.qdata, weight.scale  # per row and group of g inputs: w ~ (q - zero point) * scale
    low, high = (-8, 7) if cfg.scheme.endswith("int4w") else (-128, 127)
    assert q.dtype == torch.int8 and int(q.min()) >= low and int(q.max()) <= high  # the scheme's integer range
    assert int(q.abs().max()) >= high  # each group's largest weight sits at the end of the range (symmetric)
    rows, cols = reference.shape
    g = cfg.group_size or cols
    scale, zero = scale.reshape(rows, cols // g), weight.zero_point.reshape(rows, cols // g)
    dequantized = (q.float().view(rows, cols // g, g) - zero.float().unsqueeze(-1)) * scale.unsqueeze(-1)
    error = (dequantized.view(rows, cols) - reference).abs()
    assert (error <= scale.repeat_interleave(g, dim=1) / 2 + 1e-6).all()  # rounding to the nearest level


def test_post_training_quantization_of_a_float_model_quantizes_the_same_linears():
    model = tiny_model()
    float_bytes = parameter_bytes(model)
    qat.convert(model, INT8DA)  # no prepare: post-training quantization
    kinds = {n: type(m.weight).__name__ for n, m in model.named_modules() if n in qat.quantized_linears(tiny_model(), 32)}
    assert set(kinds.values()) == {"IntxUnpackedToInt8Tensor"}
    assert type(model.output.weight).__name__ in ("Parameter", "Tensor")  # the tied head stays float
    assert parameter_bytes(model) < float_bytes


def test_a_group_size_that_does_not_divide_is_refused():
    with pytest.raises(ConfigError, match="qat.group_size=48 does not divide"):
        qat.quantized_linears(tiny_model(), 48)


@pytest.mark.parametrize("override,message", [
    ("peft.method=lora", "with adapters is not supported yet"),
    ("qat.scheme=int3", "choose one of none, int8da-int4w, int4w, int8da-int8w, int8w"),
])
def test_unsupported_combinations_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("default", ["qat.scheme=int4w", override] if "scheme" not in override else [override])


def test_sharded_qat_of_your_own_model_is_refused(tiny_config):
    with pytest.raises(ConfigError, match="with your own model use none, ddp or zero1"):
        build_run(tiny_config("qat.scheme=int4w", "parallel.strategy=zero3"), model=torch.nn.Linear(4, 4),
                  loss_fn=lambda m, b: m(b[0]).sum(), train_batches=lambda step, micro: (torch.zeros(1, 4),))


def test_a_qat_run_saves_a_quantized_model_whose_loss_is_the_fake_quantized_one(tiny_config, tmp_path):
    summary = hasten.train(tiny_config("qat.scheme=int8da-int4w", "train.steps=12", "train.eval_every=12",
                                       "train.compile=false"))
    run_dir = tmp_path / "run"
    assert summary["quantized_val_loss"] == pytest.approx(summary["final_val_loss"], abs=1e-5)
    assert summary["quantized_weight_bytes"] < summary["float_weight_bytes"]
    assert json.loads((run_dir / "summary.json").read_text())["quantized_val_loss"] == summary["quantized_val_loss"]
    # The saved model is the checkpoint's float weights converted, compared on the device the run converted
    # them on (on an H200 its logits differed from a conversion on the CPU by up to 5e-3).
    device = summary["device"]
    there, _ = qat.load_quantized(run_dir, device)
    float_model, _, _ = hasten.api.load_trained(run_dir, device)  # the checkpoint: float weights, as trained
    with torch.no_grad():
        qat.convert(float_model, INT8DA)
        torch.testing.assert_close(there(batch(2, 16).to(device)), float_model(batch(2, 16).to(device)))
    model, _ = qat.load_quantized(run_dir)  # on the CPU, where `hasten generate --quantized` loads it
    assert type(model.layers[0].mixer.wq.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert model.output.weight is model.tok_embeddings.weight  # still tied after loading
    from hasten.bench.runner import (
        measure_inference,  # hasten bench measures the quantized model
    )

    measured = measure_inference(run_dir, batch_size=2, repeats=2)
    assert measured["model_bytes"] == summary["quantized_weight_bytes"] < summary["float_weight_bytes"]
    # `hasten generate --quantized` samples from the quantized model: greedy, its tokens are the argmax
    # of the quantized logits step by step (the float model's differ in general)
    text = hasten.api.generate_text(run_dir, "def ", max_new_tokens=8, temperature=0.0, quantized=True)
    tokenizer = hasten.api.load_trained(run_dir)[1]
    ids = tokenizer.encode("def ")
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert text == tokenizer.decode(ids)
    (run_dir / qat.QUANTIZED_FILE).rename(tmp_path / "moved.pt")  # the flag reads quantized.pt, nothing else
    with pytest.raises(FileNotFoundError, match="did not finish with qat.scheme set"):
        hasten.api.generate_text(run_dir, "def ", max_new_tokens=2, quantized=True)


def test_post_training_quantization_trains_in_float_and_reports_the_quantized_loss(tiny_config):
    cfg = tiny_config("qat.scheme=int8da-int4w", "qat.fake_quant=false", "train.steps=12", "train.eval_every=12",
                      "train.compile=false", "precision.dtype=bf16")  # quantized under bf16 autocast too
    run = build_run(cfg)
    assert not any(type(m).__name__ == "FakeQuantizedLinear" for m in run.model.modules())
    summary = hasten.train(cfg)
    assert summary["quantized_val_loss"] != pytest.approx(summary["final_val_loss"], abs=1e-6)
    assert summary["qat_fake_quant"] is False


@pytest.mark.parametrize("layers", [dict(ffns="E"), dict(mixers="M")], ids=["moe", "mamba"])
def test_moe_routers_stay_float_and_other_architectures_prepare_and_convert(layers):
    model = tiny_model(**layers)
    names = qat.quantized_linears(model, 32)
    assert names and not any(n.endswith("router") for n in names)
    idx = batch(2, 16)
    qat.prepare(model, INT8DA)
    with torch.no_grad():
        fake = model(idx)
        qat.convert(model, INT8DA)
        torch.testing.assert_close(model(idx), fake, atol=1e-5, rtol=1e-5)


def test_qat_fine_tunes_a_hugging_face_folder(tiny_config, tmp_path):
    """model.from a Hugging Face Llama folder (Qwen2's q/k/v biases included): QAT trains from its
    weights and writes the quantized model; the float checkpoint stays a plain hasten run."""
    pytest.importorskip("transformers")
    from tests.unit.test_peft import make_hf_llama

    make_hf_llama(tmp_path / "hf", arch="Qwen2", tie=True)
    summary = hasten.train(tiny_config(f"model.from={tmp_path / 'hf'}", "qat.scheme=int4w", "train.steps=4",
                                       "train.eval_every=4", "train.compile=false"))
    assert summary["quantized_val_loss"] == pytest.approx(summary["final_val_loss"], abs=1e-5)
    model, _ = qat.load_quantized(tmp_path / "run")
    assert model.layers[0].mixer.wq.bias is not None  # the biases came along, unquantized
    assert type(model.layers[0].mixer.wq.weight).__name__ == "IntxUnpackedToInt8Tensor"


def test_fake_quantized_training_compiles():
    model, reference = tiny_model(n_layers=1), tiny_model(n_layers=1)
    qat.prepare(model, INT8DA)
    qat.prepare(reference, INT8DA)
    idx = batch(2, 16)
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(idx), reference(idx), atol=1e-4, rtol=1e-4)
    compiled(idx).float().pow(2).mean().backward()
    assert model.layers[0].mixer.wq.weight.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_quantized_model_loads_onto_the_gpu_named_plain_cuda(tiny_config, tmp_path):
    """hasten bench times inference on torch.device("cuda"): the quantized tensors loaded there must
    land where the converted model's are (cuda:N), which load_state_dict(assign=True) insists on."""
    hasten.train(tiny_config("qat.scheme=int8da-int4w", "train.steps=4", "train.eval_every=4", "train.compile=false"))
    model, _ = qat.load_quantized(tmp_path / "run", torch.device("cuda"))
    assert model.layers[0].mixer.wq.weight.device.type == "cuda"
    with torch.no_grad():
        assert torch.isfinite(model(batch(2, 16).cuda())).all()
