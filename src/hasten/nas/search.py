"""The search: first-order DARTS with a latency term, on hasten's data and precision.

Each step (1) trains the supernet's weights on a training batch, and, after `nas.warmup_steps`,
(2) trains the architecture parameters on another training batch (never the validation set,
which stays for judging the result) with

    loss_alpha = cross-entropy + latency_weight * E[latency] / latency(all first candidates),

E[latency] being the sum over layers and searched slots (mixer, and FFN with nas.ffn_candidates) of
sum_k p_k * measured latency_k (supernet.expected_latency). The
first-order approximation (alpha's gradient taken at the current weights, not through a virtual
weight step) is DARTS's cheaper variant, which its authors found close to the second-order one.
The derived patterns (each layer's argmax) and everything measured go to `<out_dir>/nas.json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any

import torch

from hasten.config import ConfigError, RunConfig
from hasten.nas.latency import latency_table
from hasten.nas.supernet import (
    architecture_parameters,
    build_supernet,
    check_candidates,
    derive,
    expected_latency,
    mixed_layers,
    weight_parameters,
)


def search(config: RunConfig, latency_ms: dict[str, float] | None = None) -> dict[str, Any]:
    """Run the search; returns (and writes to nas.json) the derived pattern and its numbers.
    `latency_ms` replaces the measured table (e.g. one measured on the deployment device)."""
    from hasten.train.build import build_run
    from hasten.train.loop import split_loss

    nas = config.nas
    letters = check_candidates(nas.candidates)
    ffn_letters = check_candidates(nas.ffn_candidates, ffn=True) if nas.ffn_candidates else ""
    if config.parallel.strategy != "none":
        raise ConfigError(f"hasten nas runs in one process; parallel.strategy={config.parallel.strategy} is not "
                          "supported (set none).")
    # The run gives data, tokenizer, device and precision; its own model and optimizer are not used.
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, compile=False),
                                 checkpoint=dataclasses.replace(config.checkpoint, every=0, at_end=False))
    run = build_run(config)
    device, model_cfg, vocab = run.device, run.config.model, run.info["vocab_size"]
    run.model, run.optimizer = None, None
    seq_len = nas.latency_seq_len or config.train.seq_len
    inference_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if latency_ms is None:
        latency_ms = latency_table(model_cfg, letters + ffn_letters, nas.latency_batch, seq_len, device,
                                   inference_dtype)
    missing = [c for c in letters + ffn_letters if c not in latency_ms]
    if missing:
        raise ValueError(f"the latency table has no entry for {missing}")
    first = letters[0] + ffn_letters[:1]
    base_ms = model_cfg.n_layers * sum(latency_ms[c] for c in first)
    _print(f"latency of one layer's module (batch {nas.latency_batch}, seq {seq_len}, {device}): "
           + ", ".join(f"{c} {latency_ms[c]:.3f} ms" for c in letters + ffn_letters))

    torch.manual_seed(config.train.seed)
    model = build_supernet(model_cfg, vocab, letters, device, ffn_letters)
    o = config.optim
    weights = weight_parameters(model)
    weights_opt = torch.optim.AdamW(weights, lr=o.lr, betas=(o.beta1, o.beta2),
                                    weight_decay=o.weight_decay)
    alpha_opt = torch.optim.Adam(architecture_parameters(model), lr=nas.alpha_lr, betas=(0.5, 0.999),
                                 weight_decay=1e-3)  # DARTS's settings for alpha

    def loss_on(batch_index: int) -> torch.Tensor:
        batch = tuple(t.to(device) for t in run.train_batches(batch_index, 0))
        with run.precision.autocast():
            return split_loss(run.loss_fn(model, batch))[0].float()

    history, start = [], time.perf_counter()
    model.train()
    for step in range(nas.steps):
        lr = o.lr * min(1.0, (step + 1) / max(1, o.warmup_steps))  # linear warmup, then constant
        for group in weights_opt.param_groups:
            group["lr"] = lr
        loss = loss_on(2 * step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(weights, config.train.grad_clip or math.inf)
        weights_opt.step()
        weights_opt.zero_grad(set_to_none=True)
        alpha_opt.zero_grad(set_to_none=True)
        latency = expected_latency(model, latency_ms)
        arch_loss = None
        if step >= nas.warmup_steps:
            ce = loss_on(2 * step + 1)
            arch_loss = ce + nas.latency_weight * latency.to(ce.device) / base_ms
            arch_loss.backward()
            alpha_opt.step()
            alpha_opt.zero_grad(set_to_none=True)
            weights_opt.zero_grad(set_to_none=True)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"the search loss is {loss.item()} at step {step}; lower optim.lr")
        if (step + 1) % config.log.every == 0 or step + 1 == nas.steps:
            record = dict(step=step + 1, loss=loss.item(), expected_latency_ms=latency.item(),
                          pattern=derive(model), ffn_pattern=derive(model, "ffn"), elapsed_s=time.perf_counter() - start)
            history.append(record)
            _print(f"step {step + 1:>5}  loss {loss.item():.4f}  expected latency {latency.item():.3f} ms  "
                   f"argmax {record['pattern']} {record['ffn_pattern']}".rstrip())

    pattern, ffn_pattern = derive(model), derive(model, "ffn")
    overrides = f"model.mixers={pattern}" + (f" model.ffns={ffn_pattern}" if ffn_pattern else "")
    result = dict(
        derived_mixers=pattern, derived_ffns=ffn_pattern, candidates=letters, ffn_candidates=ffn_letters,
        latency_ms=latency_ms,
        latency_setting=dict(batch=nas.latency_batch, seq_len=seq_len, device=str(device),
                             dtype=str(inference_dtype).removeprefix("torch.")),
        derived_latency_ms=sum(latency_ms[c] for c in pattern + ffn_pattern),
        all_first_latency_ms=base_ms,
        probabilities=[[round(float(p), 4) for p in m.probabilities().detach()] for m in mixed_layers(model, "mixer")],
        ffn_probabilities=[[round(float(p), 4) for p in m.probabilities().detach()]
                           for m in mixed_layers(model, "ffn")],
        latency_weight=nas.latency_weight, steps=nas.steps, warmup_steps=nas.warmup_steps, history=history,
        search_seconds=time.perf_counter() - start,
        train_command=f"hasten train RECIPE {overrides}",
    )
    if run.rank == 0:
        (run.run_dir / "nas.json").write_text(json.dumps(result, indent=1))
        _print(f"derived: {overrides} (latency {result['derived_latency_ms']:.3f} ms against {base_ms:.3f} ms "
               f"all-{first}); train it with these overrides; {run.run_dir / 'nas.json'}")
    return result


def _print(text: str) -> None:
    print(text, flush=True)
