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

Nothing is lost on a stop: the search state (supernet weights, architecture parameters, both
optimizers, step, history, latency table) goes to `<out_dir>/nas_state.pt` every
`checkpoint.every` steps, at the end, and on SIGINT/SIGTERM (which also write a partial nas.json);
`train.resume=auto` continues from it, to the same result as an uninterrupted search.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
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
    save_every, resume = config.checkpoint.every, config.train.resume
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, compile=False),
                                 checkpoint=dataclasses.replace(config.checkpoint, every=0, at_end=False))
    run = build_run(config)
    state_path = run.run_dir / STATE_FILE
    if resume == "none":
        state_path.unlink(missing_ok=True)  # a fresh search
    state = _load_state(run.run_dir, resume, device=run.device)
    if state is not None and latency_ms is None:
        latency_ms = state["latency_ms"]  # the resumed search keeps the table it started with
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

    history, start, first_step = [], time.perf_counter(), 0
    if state is not None:
        if (state["candidates"], state["ffn_candidates"], state["n_layers"]) != (letters, ffn_letters,
                                                                                  model_cfg.n_layers):
            raise ConfigError(f"train.resume: {state_path} searched {state['candidates']}/"
                              f"{state['ffn_candidates'] or '-'} over {state['n_layers']} layers, not {letters}/"
                              f"{ffn_letters or '-'} over {model_cfg.n_layers}; use train.resume=none to start over.")
        model.load_state_dict(state["model"])
        weights_opt.load_state_dict(state["weights_opt"])
        alpha_opt.load_state_dict(state["alpha_opt"])
        first_step, history = state["step"], state["history"]
        start -= state["elapsed_s"]
        _print(f"resumed the search at step {first_step} from {state_path}")

    def search_step(step: int) -> int:
        """One step of the weights and (after the warm-up) of the architecture; returns the next step."""
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
        if step >= nas.warmup_steps:
            ce = loss_on(2 * step + 1)
            arch_loss = ce + nas.latency_weight * latency.to(ce.device) / base_ms
            arch_loss.backward()
            alpha_opt.step()
            alpha_opt.zero_grad(set_to_none=True)
            weights_opt.zero_grad(set_to_none=True)
        value = loss.item()  # one host sync per step: the search stops at once on a non-finite loss
        if not math.isfinite(value):
            raise FloatingPointError(f"the search loss is {value} at step {step}; lower optim.lr")
        if (step + 1) % config.log.every == 0 or step + 1 == nas.steps:
            record = dict(step=step + 1, loss=value, expected_latency_ms=latency.item(),
                          pattern=derive(model), ffn_pattern=derive(model, "ffn"), elapsed_s=time.perf_counter() - start)
            history.append(record)
            _print(f"step {step + 1:>5}  loss {value:.4f}  expected latency {latency.item():.3f} ms  "
                   f"argmax {record['pattern']} {record['ffn_pattern']}".rstrip())
        return step + 1

    def save_state(step: int) -> None:
        if run.rank == 0:
            _atomic_save(dict(model=model.state_dict(), weights_opt=weights_opt.state_dict(),
                              alpha_opt=alpha_opt.state_dict(), step=step, history=history, latency_ms=latency_ms,
                              candidates=letters, ffn_candidates=ffn_letters, n_layers=model_cfg.n_layers,
                              elapsed_s=time.perf_counter() - start), state_path)

    from hasten.train.guard import StopSignal

    model.train()
    step, stopped = first_step, ""
    with StopSignal() as stop:
        while step < nas.steps and not stopped:
            step = search_step(step)
            if stop.requested:
                stopped = stop.signal_name
            if stopped or step == nas.steps or (save_every and step % save_every == 0):
                save_state(step)
    if stopped:
        _print(f"stopped by {stopped} at step {step} of {nas.steps}; the search state is in {state_path}: "
               "run the same command with train.resume=auto to continue")

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
        complete=not stopped, steps_done=step,
    )
    if run.rank == 0:
        (run.run_dir / "nas.json").write_text(json.dumps(result, indent=1))
        _print(f"derived{' so far' if stopped else ''}: {overrides} (latency {result['derived_latency_ms']:.3f} ms "
               f"against {base_ms:.3f} ms all-{first}); train it with these overrides; {run.run_dir / 'nas.json'}")
    return result


STATE_FILE = "nas_state.pt"


def _load_state(run_dir: Path, resume: str, device: torch.device) -> dict[str, Any] | None:
    """The search state to continue from: none, the run folder's ('auto'), or a given file or folder."""
    if resume == "none":
        return None
    path = run_dir / STATE_FILE if resume == "auto" else Path(resume)
    path = path / STATE_FILE if path.is_dir() else path
    if not path.is_file():
        if resume == "auto":
            return None
        raise ConfigError(f"train.resume={resume!r}: no search state there (no {STATE_FILE}).")
    return torch.load(path, map_location=device, weights_only=False)


def _atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file, then rename: a crash never leaves a half-written state."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _print(text: str) -> None:
    print(text, flush=True)
