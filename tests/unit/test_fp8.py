"""fp8 training through torchao.float8: which linears convert, how close the numbers stay, a run end
to end (the CPU runs torch._scaled_mm, so the arithmetic is tested here; the speed is the GPU's)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hasten
from hasten.config import ConfigError, load_config
from hasten.methods import precision
from hasten.methods.precision import convert_fp8, cpu_rowwise_fp8, fp8_linears
from tests.unit.test_models import batch, tiny_model

pytest.importorskip("torchao.float8")
CPU = torch.device("cpu")
# The recipe of the tests that need one: row-wise where this PyTorch's CPU fp8 matmul takes row-wise scales
# (2.13), else per-tensor (2.11's CPU build, as on a GPU machine with it).
RECIPE = "rowwise" if cpu_rowwise_fp8() else "tensorwise"
ROWWISE_ON_CPU = pytest.mark.skipif(not cpu_rowwise_fp8(), reason="this PyTorch's CPU _scaled_mm has no row-wise scales")


def _loss(model, idx):
    return F.cross_entropy(model(idx[:, :-1]).float().flatten(0, 1), idx[:, 1:].flatten())


def test_the_block_linears_convert_and_the_head_and_names_stay():
    model = tiny_model()
    keys = set(model.state_dict())
    names = convert_fp8(model, RECIPE, CPU)
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert names and all(kinds[n] == "Float8Linear" for n in names)
    assert kinds["output"] == "Linear" and "output" not in names
    assert set(model.state_dict()) == keys  # checkpoints load either way
    assert fp8_linears(tiny_model(dim=72, n_heads=4)) == []  # 72 = 4 x 18: no dimension fits fp8 kernels


@pytest.mark.parametrize("recipe", ["tensorwise", pytest.param("rowwise", marks=ROWWISE_ON_CPU)])
def test_fp8_loss_and_gradients_stay_close_to_fp32(recipe):
    idx = batch(4, 33)
    reference, fp8 = tiny_model(), tiny_model()
    convert_fp8(fp8, recipe, CPU)
    loss_ref, loss_fp8 = _loss(reference, idx), _loss(fp8, idx)
    assert loss_fp8.item() != loss_ref.item()  # the matmuls really ran in fp8
    assert abs(loss_fp8.item() - loss_ref.item()) < 0.02 * loss_ref.item()
    loss_ref.backward()
    loss_fp8.backward()
    for (name, p), q in zip(reference.named_parameters(), fp8.parameters()):
        cosine = F.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0)
        assert cosine > 0.99, (name, cosine.item())  # fp8 keeps 3 (e4m3) or 2 (e5m2) mantissa bits


def test_an_fp8_run_trains_and_its_checkpoint_loads_as_a_plain_model(tiny_config, tmp_path):
    summary = hasten.train(tiny_config(f"precision.fp8={RECIPE}", "train.steps=10", "train.eval_every=10",
                                       "log.every=5", "train.compile=false"))
    assert summary["fp8_linears"] > 0 and summary["final_loss"] < 5.0 and summary["completed"]
    model, _, _ = hasten.api.load_trained(tmp_path / "run")
    assert not any(type(m).__name__ == "Float8Linear" for m in model.modules())


@pytest.mark.parametrize("override,message", [("peft.method=lora", "use one of them"),
                                              ("qat.scheme=int4w", "use one of them")])
def test_fp8_refuses_what_it_cannot_run_with(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("default", ["precision.fp8=rowwise", override])


def test_fp8_training_compiles():
    model, reference = tiny_model(n_layers=1), tiny_model(n_layers=1)
    convert_fp8(model, RECIPE, CPU)
    convert_fp8(reference, RECIPE, CPU)
    idx = batch(2, 16)
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(idx), reference(idx), atol=1e-2, rtol=1e-2)  # fused casts may round apart
    compiled(idx).float().pow(2).mean().backward()
    assert model.layers[0].mixer.wq.weight.grad is not None


def test_rowwise_on_a_cpu_without_row_wise_scales_is_refused_with_one_sentence(monkeypatch):
    monkeypatch.setattr(precision, "cpu_rowwise_fp8", lambda: False)  # as PyTorch 2.11's CPU build answers
    with pytest.raises(ConfigError, match="precision.fp8=rowwise on the CPU needs row-wise scales in torch._scaled_mm"):
        convert_fp8(tiny_model(), "rowwise", CPU)
    assert convert_fp8(tiny_model(), "tensorwise", CPU)  # the per-tensor recipe still converts
