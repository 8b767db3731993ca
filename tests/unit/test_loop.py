"""The trainer on real tiny runs: precisions, accumulation, exact resume, guards, user models."""

import importlib
import json
import math
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import hasten
from hasten.train.checkpoint import list_checkpoints
from hasten.train.log import read_log


def _losses(run_dir, event="train", key="loss"):
    return {r["step"]: r[key] for r in read_log(run_dir / "metrics.jsonl") if r["event"] == event}


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_each_precision_trains_and_loss_falls(tiny_config, dtype):
    cfg = tiny_config(f"precision.dtype={dtype}", "train.steps=30", "log.every=5", "train.eval_every=30",
                      "optim.lr=3e-3", out=dtype)
    summary = hasten.train(cfg)
    cfg_dir = Path(cfg.train.out_dir)
    losses = _losses(cfg_dir)
    assert summary["precision"] == dtype and summary["completed"]
    assert all(math.isfinite(v) for v in losses.values())
    assert losses[30] < losses[5] - 0.5
    assert math.isfinite(summary["final_val_loss"])
    records = read_log(cfg_dir / "metrics.jsonl")
    if dtype == "fp16":  # the loss scale is logged and overflow steps are counted, not hidden
        assert all("loss_scale" in r for r in records if r["event"] == "train")
    assert summary["skipped_steps"] >= 0


def test_resume_is_bit_exact(tiny_config, tmp_path):
    """2N steps straight equal N steps + resume + N steps, loss for loss, with dropout on."""
    common = ("train.steps=8", "checkpoint.every=4", "checkpoint.keep=3", "log.every=1", "model.dropout=0.1",
              "train.grad_accum=2", "train.eval_every=4")
    straight = tiny_config(*common, out="straight")
    hasten.train(straight)
    straight_dir = tmp_path / "straight"
    half = list_checkpoints(straight_dir)[0]
    assert half.name == "step_0000004"
    resumed = tiny_config(*common, f"train.resume={half}", out="resumed")
    hasten.train(resumed)
    a, b = _losses(straight_dir), _losses(tmp_path / "resumed")
    assert sorted(b) == [5, 6, 7, 8]
    assert [a[s] for s in b] == [b[s] for s in b]  # exact equality, not approximate
    assert _losses(straight_dir, "eval", "val_loss")[8] == _losses(tmp_path / "resumed", "eval", "val_loss")[8]


def test_resume_auto_continues_and_rewrites_the_log(tiny_config, tmp_path):
    first = tiny_config("train.steps=6", "checkpoint.every=3", "log.every=1", out="run")
    hasten.train(first)
    again = tiny_config("train.steps=9", "checkpoint.every=3", "log.every=1", "train.resume=auto", out="run")
    summary = hasten.train(again)
    steps = [r["step"] for r in read_log(tmp_path / "run" / "metrics.jsonl") if r["event"] == "train"]
    assert steps == list(range(1, 10)) and summary["steps"] == 9
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_0000006", "step_0000009"]


def test_checkpoints_are_pruned_and_complete(tiny_config, tmp_path):
    hasten.train(tiny_config("train.steps=10", "checkpoint.every=2", "checkpoint.keep=2", out="run"))
    found = list_checkpoints(tmp_path / "run")
    assert [p.name for p in found] == ["step_0000008", "step_0000010"]
    assert not list((tmp_path / "run" / "checkpoints").glob("*.tmp"))
    state = json.loads((found[-1] / "trainer_state.json").read_text())
    assert state["step"] == 10 and state["tokens_seen"] == 10 * 4 * 32


def test_resume_from_a_checkpoint_of_another_model_fails_clearly(tiny_config, tmp_path):
    hasten.train(tiny_config("train.steps=2", out="small"))
    ckpt = list_checkpoints(tmp_path / "small")[-1]
    with pytest.raises(hasten.ConfigError, match="does not match this model"):
        hasten.train(tiny_config("train.steps=4", "model.dim=128", f"train.resume={ckpt}", out="other"))


class Regression(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 1)

    def forward(self, x):
        return self.linear(x)


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _regression_batches(bad_from=None, bad_steps=()):
    def batches(step, micro):
        g = torch.Generator().manual_seed(step * 100 + micro)
        x = torch.randn(16, 8, generator=g)
        y = x.sum(dim=1, keepdim=True)
        if step in bad_steps or (bad_from is not None and step >= bad_from):
            x = x.clone()
            x[0, 0] = float("nan")
        return x, y
    return batches


def test_user_model_and_loss(tiny_config):
    cfg = tiny_config("train.steps=40", "optim.lr=0.05", "optim.weight_decay=0", "log.every=10",
                      "train.eval_every=0")
    torch.manual_seed(0)
    summary = hasten.train(cfg, model=Regression(), loss_fn=mse, train_batches=_regression_batches())
    assert summary["completed"] and summary["final_loss"] < 1.0
    assert summary["params"] == 9


def test_user_model_with_loss_chunk_is_refused(tiny_config):
    with pytest.raises(hasten.ConfigError, match="train.loss_chunk applies to hasten's own decoder"):
        hasten.train(tiny_config("train.loss_chunk=64"), model=Regression(), loss_fn=mse,
                     train_batches=_regression_batches())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a GPU-only loss kernel on the CPU")
@pytest.mark.parametrize("kernel, fragment", [("quack", "train.loss_kernel=quack runs on a Hopper GPU"),
                                              ("triton", "train.loss_kernel=triton runs on CUDA with Triton")])
def test_gpu_loss_kernels_are_refused_on_the_cpu(tiny_config, kernel, fragment):
    with pytest.raises(hasten.ConfigError, match=fragment):
        hasten.train(tiny_config("train.loss_chunk=64", f"train.loss_kernel={kernel}"))


def test_compiling_on_a_cpu_without_a_cxx_compiler_is_refused_at_once(tiny_config, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler++")
    with pytest.raises(hasten.ConfigError, match="train.compile=true on the CPU needs a C\\+\\+ compiler for the generated "
                                                 "code, and 'no-such-compiler\\+\\+' is not installed"):
        hasten.train(tiny_config("train.compile=true", "train.device=cpu"))


def test_non_finite_steps_are_skipped_and_counted(tiny_config):
    cfg = tiny_config("train.steps=12", "log.every=4", "train.eval_every=0")
    torch.manual_seed(0)
    model = Regression()
    summary = hasten.train(cfg, model=model, loss_fn=mse, train_batches=_regression_batches(bad_steps={3, 7}))
    assert summary["completed"] and summary["skipped_steps"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_run_of_bad_steps_stops_after_saving(tiny_config, tmp_path):
    cfg = tiny_config("train.steps=50", "log.every=2", "train.max_bad_steps=3", "train.eval_every=0",
                      "checkpoint.every=0")
    summary = hasten.train(cfg, model=Regression(), loss_fn=mse, train_batches=_regression_batches(bad_from=5))
    assert not summary["completed"]
    assert "consecutive steps had a non-finite loss" in summary["stop_reason"]
    assert 8 <= summary["steps"] <= 10
    assert list_checkpoints(tmp_path / "run")[-1].name == f"step_{summary['steps']:07d}"


def _defer_log_reads(monkeypatch, defer=True):
    """The deferred read's order (a log step read once the next step is queued) on the CPU, where
    it is otherwise taken on CUDA alone: the values are the same, only read a step later."""
    loop = importlib.import_module("hasten.train.loop")
    monkeypatch.setattr(loop, "defers_log_read", lambda run: defer)


def test_a_deferred_log_read_logs_the_same_records(tiny_config, tmp_path, monkeypatch):
    common = ("train.device=cpu", "train.steps=12", "log.every=2", "train.eval_every=4", "checkpoint.every=6",
              "checkpoint.keep=5")
    _defer_log_reads(monkeypatch, False)
    hasten.train(tiny_config(*common, out="now"))
    _defer_log_reads(monkeypatch)
    summary = hasten.train(tiny_config(*common, out="deferred"))
    assert summary["completed"] and summary["tokens_per_second"] > 0
    fields = ("event", "step", "loss", "val_loss", "lr", "tokens", "skipped_steps")
    records = [[{k: r[k] for k in fields if k in r} for r in read_log(tmp_path / name / "metrics.jsonl")
                if r["event"] in ("train", "eval")] for name in ("now", "deferred")]
    assert records[0] == records[1] and [r["step"] for r in records[1] if r["event"] == "train"] == list(range(2, 13, 2))
    assert [c.name for c in list_checkpoints(tmp_path / "deferred")] == ["step_0000006", "step_0000012"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pinned copy and its event are CUDA's")
def test_counters_copied_without_waiting_read_the_same_values():
    loop = importlib.import_module("hasten.train.loop")
    reads = []
    for defer in (False, True):
        counters = loop.DeviceCounters.zeros(torch.device("cuda"))
        for step in range(3):
            loss = torch.tensor(float("nan") if step == 1 else step + 0.5, device="cuda")
            counters.add_step(loss, torch.tensor(float(step == 1), device="cuda"))
            counters.add_terms({"aux": torch.tensor(2.0 * step, device="cuda")})
        read = counters.snapshot(defer)
        assert (read.done is not None) == defer and read.values.is_pinned() == defer
        counters.add_step(torch.tensor(100.0, device="cuda"), torch.tensor(0.0, device="cuda"))  # after: not in it
        reads.append(read.result())
    assert reads[0] == reads[1] == dict(loss=1.5, skipped=1.0, streak=0.0, worst=1.0, terms={"aux": 2.0})


def test_a_deferred_log_read_still_stops_a_run_of_bad_steps(tiny_config, tmp_path, monkeypatch):
    _defer_log_reads(monkeypatch)
    cfg = tiny_config("train.steps=50", "log.every=2", "train.max_bad_steps=3", "train.eval_every=0",
                      "checkpoint.every=0")
    summary = hasten.train(cfg, model=Regression(), loss_fn=mse, train_batches=_regression_batches(bad_from=5))
    assert "consecutive steps had a non-finite loss" in summary["stop_reason"]
    assert 9 <= summary["steps"] <= 11  # read a step after the log step that saw the streak
    assert list_checkpoints(tmp_path / "run")[-1].name == f"step_{summary['steps']:07d}"
    assert summary["skipped_steps"] == summary["steps"] - 5  # every step from the sixth, the last one too


def test_gradient_accumulation_matches_the_big_batch(tiny_config):
    """Two half batches accumulated give the update of the whole batch (mean losses)."""
    def full(step, micro):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(16, 8, generator=g)
        return x, x.sum(dim=1, keepdim=True)

    def halves(step, micro):
        x, y = full(step, 0)
        return x[micro * 8:(micro + 1) * 8], y[micro * 8:(micro + 1) * 8]

    results = []
    for accum, batches in ((1, full), (2, halves)):
        torch.manual_seed(0)
        model = Regression()
        hasten.train(tiny_config("train.steps=5", f"train.grad_accum={accum}", "train.eval_every=0",
                                 "train.device=cpu", out=f"acc{accum}"), model=model, loss_fn=mse,
                     train_batches=batches)  # on the CPU: a GPU sums the two batch shapes in other orders
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


def test_user_model_needs_loss_and_batches(tiny_config):
    with pytest.raises(hasten.ConfigError, match="needs loss_fn"):
        hasten.train(tiny_config(), model=Regression())


def test_summary_and_artifacts(tiny_config, tmp_path):
    cfg = tiny_config("train.steps=6", "log.every=2", "log.plot=true", "log.tensorboard=true",
                      "log.sample_tokens=8", out="arts")
    summary = hasten.train(cfg)
    run = tmp_path / "arts"
    for name in ("config.toml", "metrics.jsonl", "summary.json", "loss.png", "tokenizer"):
        assert (run / name).exists(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert summary["tokens_per_second"] > 0 and summary["peak_memory_gib"] > 0
    assert (summary["mfu"] is None) == (summary["device"] == "cpu")  # no datasheet peak for a CPU
    assert summary["unigram_val_loss"] > 0 and summary["sample"].startswith("def ")
    assert hasten.load_config(run / "config.toml") == cfg


def test_time_limit_stops_with_a_checkpoint_and_a_final_eval(tiny_config, tmp_path):
    summary = hasten.train(tiny_config("train.steps=1000000", "train.time_limit_s=1.5", "train.eval_every=0",
                                       "checkpoint.every=0", out="timed"))
    assert not summary["completed"] and "time limit" in summary["stop_reason"]
    assert summary["wall_time_s"] >= 1.5 and summary["first_step_s"] > 0
    assert math.isfinite(summary["final_val_loss"])
    assert list_checkpoints(tmp_path / "timed")[-1].name == f"step_{summary['steps']:07d}"


def test_evaluation_time_does_not_count_against_the_time_limit(tiny_config, tmp_path, monkeypatch):
    """Under one time budget every method gets the same seconds of training steps: evaluations (and
    the compilation of an evaluation graph) are left out, and each eval record carries the training
    seconds so far (train_s) beside the wall seconds."""
    loop = importlib.import_module("hasten.train.loop")  # hasten.train is also the API's function
    # an evaluation every 2 steps and the final one: two evaluations from 3 steps in 1 s, room for a
    # loaded machine (the tests run two at a time; 0.6 s with one every 5 steps once stopped after 5)
    limit, pause, evaluate = 1.0, 0.1, loop.evaluate

    def slow_evaluate(run, forward_loss):
        time.sleep(pause)
        return evaluate(run, forward_loss)

    monkeypatch.setattr(loop, "evaluate", slow_evaluate)
    summary = hasten.train(tiny_config("train.steps=1000000", f"train.time_limit_s={limit}", "train.eval_every=2",
                                       "checkpoint.every=0", out="evals"))
    evals = [json.loads(x) for x in (tmp_path / "evals" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["event"] == "eval"]
    assert "time limit" in summary["stop_reason"] and len(evals) >= 2, (summary["steps"], len(evals))
    for k, record in enumerate(evals):  # this eval's and every earlier one's sleep are wall, not training
        assert record["elapsed_s"] - record["train_s"] >= (k + 1) * pause + summary["first_step_s"] - 1e-3
    assert evals[-2]["train_s"] < limit <= evals[-1]["train_s"] < limit + 1.0  # stopped one step past it
    assert summary["wall_time_s"] >= limit + len(evals) * pause


def _lrs(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["lr"] for r in records if r.get("event") == "train"]


def test_schedule_over_time_decays_to_the_time_limit_and_continues_on_resume(tiny_config, tmp_path):
    """optim.horizon=time: the cosine spans train.time_limit_s, so a run cut by its time limit ends
    decayed; the seconds spent are checkpointed and a resumed run continues the decay from them."""
    timed = ["train.steps=1000000", "optim.horizon=time", "optim.lr=1e-3", "optim.warmup_steps=2",
             "optim.min_lr_ratio=0.1", "log.every=1", "train.eval_every=0", "checkpoint.every=0"]
    first = hasten.train(tiny_config(*timed, "train.time_limit_s=2", out="by_time"))
    lrs = _lrs(tmp_path / "by_time")
    assert "time limit" in first["stop_reason"] and len(lrs) > 6
    assert lrs[2] > 0.75e-3 and lrs[-1] < 0.2e-3  # from the peak to near the floor as the time runs out
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    resumed = hasten.train(tiny_config(*timed, "train.time_limit_s=4", "train.resume=auto", out="by_time"))
    lrs = _lrs(tmp_path / "by_time")[first["steps"]:]
    assert resumed["steps"] > first["steps"] and "time limit" in resumed["stop_reason"]
    assert 0.4e-3 < lrs[0] < 0.65e-3  # half the 4 s already spent: the cosine resumes mid-way
    assert lrs[-1] < 0.2e-3


def test_memory_budget_mode_is_checked_and_reaches_the_compiler():
    """`budget` needs compile; its fraction reaches torch.compile's partitioner, which then keeps fewer
    activations for the backward (counted from the partitioned forward graph's saved outputs)."""
    import torch._functorch.config as functorch_config
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    from hasten.config import ConfigError, load_config
    from hasten.parallel import set_memory_budget

    with pytest.raises(ConfigError, match="budget needs train.compile=true"):
        load_config("default", ["parallel.activation_checkpointing=budget"])
    with pytest.raises(ConfigError, match="parallel.activation_memory_budget"):
        load_config("default", ["parallel.activation_memory_budget=1.5"])

    def saved_bytes(budget: float) -> int:
        set_memory_budget(budget)
        torch._dynamo.reset()
        found = {}

        def forward_compiler(gm, _):
            outs = next(iter(gm.graph.find_nodes(op="output"))).args[0]
            found["bytes"] = sum(n.meta["val"].numel() * n.meta["val"].element_size() for n in outs
                                 if isinstance(getattr(n, "meta", {}).get("val"), torch.Tensor))
            return gm.forward

        backend = aot_autograd(fw_compiler=forward_compiler, bw_compiler=lambda gm, _: gm.forward,
                               partition_fn=min_cut_rematerialization_partition)
        w1, w2 = torch.randn(64, 256, requires_grad=True), torch.randn(256, 64, requires_grad=True)
        f = torch.compile(lambda x: ((torch.nn.functional.silu(x @ w1) * (x @ w1).sigmoid()) @ w2).square().sum(),
                          backend=backend)
        f(torch.randn(512, 64)).backward()
        return found["bytes"]

    try:
        assert saved_bytes(0.1) < saved_bytes(1.0)
        assert functorch_config.activation_memory_budget == 1.0
    finally:
        set_memory_budget(1.0)
        torch._dynamo.reset()


def test_a_time_limited_progress_bar_ends_where_the_time_runs_out(tmp_path, monkeypatch):
    """With train.steps unbounded and a time limit, the bar's end is the step the time should run
    out at, at the current speed, not train.steps."""
    import importlib
    import io

    from rich.console import Console

    from hasten.train.loop import expected_last_step

    log = importlib.import_module("hasten.train.log")  # `hasten.train` is also the function
    assert expected_last_step(100, 10**6, seconds_left=50.0, tokens_per_second=1000.0, tokens_per_step=100) == 600
    assert expected_last_step(100, 300, seconds_left=50.0, tokens_per_second=1000.0, tokens_per_step=100) == 300
    assert expected_last_step(100, 10**6, seconds_left=-2.0, tokens_per_second=1000.0, tokens_per_step=100) == 100
    assert expected_last_step(100, 10**6, seconds_left=50.0, tokens_per_second=0.0, tokens_per_step=100) == 10**6
    monkeypatch.setattr(log, "Console", lambda **kw: Console(file=io.StringIO(), force_terminal=True, **kw))
    logger = log.RunLogger(tmp_path, total_steps=10**6, start_step=0, tensorboard=False)
    logger.advance(10, 5.0, 1000.0, total=600)
    assert logger._progress.tasks[0].total == 600 and logger._progress.tasks[0].completed == 10
    logger.advance(20, 4.0, 1000.0)  # no estimate: the end stays
    assert logger._progress.tasks[0].total == 600
    logger.close()


def test_runs_of_other_seeds_are_scored_on_the_same_validation_windows(tiny_config) -> None:
    from hasten.train.build import build_run

    runs = [build_run(tiny_config(f"train.seed={seed}", out=f"seed{seed}")) for seed in (1, 2)]
    val = [run.val_batches(3, 0) for run in runs]
    train = [run.train_batches(3, 0) for run in runs]
    assert all(torch.equal(a, b) for a, b in zip(val[0], val[1], strict=True))
    assert not torch.equal(train[0][0], train[1][0])  # training batches still follow the seed


def test_mfu_divides_by_the_peak_of_every_rank(monkeypatch):
    """A run's tokens/s are the global batch's, so its MFU is over all ranks' devices (an H200 each)."""
    from hasten.train import metrics
    monkeypatch.setattr(metrics, "device_name", lambda device: "NVIDIA H200")
    cuda = torch.device("cuda", 0)
    assert metrics.cluster_peak_flops(cuda, "bf16", 1) == 989e12
    assert metrics.cluster_peak_flops(cuda, "bf16", 4) == 4 * 989e12
    assert metrics.cluster_peak_flops(torch.device("cpu"), "bf16", 4) is None
    # 2 ranks, each at 400 TFLOP/s of model work: 0.404 of the peak, not 0.81
    tokens_per_second, flops_per_token = 2 * 400e12 / 6e9, 6e9
    assert metrics.mfu(tokens_per_second, flops_per_token, metrics.cluster_peak_flops(cuda, "bf16", 2)) == \
        pytest.approx(400 / 989)
    # a PEFT run has no model-FLOPs count (6N over all weights does not describe an adapter step): no MFU, not 0
    assert metrics.mfu(tokens_per_second, None, metrics.cluster_peak_flops(cuda, "bf16", 2)) is None


def _clip_step_params(clip: str, max_norm: float, poison: bool = False) -> list[torch.Tensor]:
    """A small model after one AdamW step on a fixed batch, its gradient clipped by torch's
    clip_grad_norm_ ("torch"), inside the fused step ("kernel") or not at all ("none")."""
    from hasten.parallel import grad_norm
    from hasten.train.guard import clips_in_step, step_if_finite

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    # eps of the gradients' order: Adam's first update then depends on their scale, so on the clip
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, eps=0.5, fused=True)
    model(torch.randn(32, 8)).pow(2).sum().backward()
    params = list(model.parameters())
    if poison:
        params[0].grad[0, 0] = math.inf
    if clip == "kernel":
        assert clips_in_step(opt, None, params)
        step_if_finite(opt, grad_norm(params), None, clip_to=max_norm)
    else:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if clip == "torch" else grad_norm(params)
        step_if_finite(opt, norm, None)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    return [p.detach().clone() for p in params]


def test_gradient_clipping_inside_the_fused_step_matches_clipping_first():
    for max_norm in (0.05, 1e6):  # clipped hard, and not clipped at all
        kernel, first = _clip_step_params("kernel", max_norm), _clip_step_params("torch", max_norm)
        for a, b in zip(kernel, first):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    unclipped = _clip_step_params("none", math.inf)
    assert all(not torch.allclose(a, b, rtol=1e-3) for a, b in zip(_clip_step_params("kernel", 0.05), unclipped))
    # a non-finite gradient still skips the step inside the kernel
    torch.manual_seed(0)
    start = [p.detach().clone() for p in nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).parameters()]
    for a, b in zip(_clip_step_params("kernel", 0.05, poison=True), start):
        assert torch.equal(a, b)


def test_only_a_fused_optimizer_without_grad_scaler_clips_in_its_step():
    from hasten.train.guard import clips_in_step

    params = list(nn.Linear(4, 4).parameters())
    assert clips_in_step(torch.optim.AdamW(params, fused=True), None, params)
    assert not clips_in_step(torch.optim.AdamW(params, foreach=True), None, params)
    assert not clips_in_step(torch.optim.AdamW(params, fused=True), torch.amp.GradScaler("cpu"), params)


def test_compile_scope_blocks_compiles_each_block_and_trains_as_eager(tiny_config):
    """train.compile_scope=blocks compiles each block alone (the loss function stays uncompiled) and
    trains to the uncompiled run's losses; a model without `layers` is refused."""
    from hasten.config import ConfigError
    from hasten.train.build import build_run, compiled_loss

    steps = ("train.steps=6", "log.every=2", "train.eval_every=0", "train.compile_scope=blocks")
    run = build_run(tiny_config(*steps, "train.compile=true", out="probe"))
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in run.model.layers)
    assert not hasattr(compiled_loss(run), "_torchdynamo_orig_callable")  # the loss itself is not compiled
    eager, blocks = (tiny_config(*steps, f"train.compile={on}", out=on) for on in ("false", "true"))
    hasten.train(eager)
    torch._dynamo.reset()
    hasten.train(blocks)
    a, b = _losses(Path(eager.train.out_dir)), _losses(Path(blocks.train.out_dir))
    assert a.keys() == b.keys() == {2, 4, 6}
    assert all(math.isclose(a[s], b[s], rel_tol=1e-4) for s in a), (a, b)
    with pytest.raises(ConfigError, match="compile_scope=blocks"):
        build_run(tiny_config(*steps, "train.compile=true", out="user"), model=Regression(), loss_fn=mse,
                  train_batches=_regression_batches())
