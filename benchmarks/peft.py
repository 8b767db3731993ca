"""Fine-tuning methods compared on one pretrained-shaped model and one instruction set: full
fine-tuning, LoRA, DoRA and QLoRA, each through `hasten.train` with the same steps, batch,
sequence length and schedule. Reported per method: trainable parameters, tokens/s, peak memory,
final training and validation loss (response tokens only), and the wall time.

The base model is a Hugging Face Llama folder (`--model PATH`); without one, a randomly
initialized Llama of the TinyLlama-1.1B shape is written first (throughput and memory are then
representative, losses are not meaningful). The data is an instruction JSONL (`--data PATH`,
prompt/response records); without one, synthetic arithmetic questions are generated.

On the H200 (QLoRA needs bitsandbytes installed):

    PYTHONPATH=src python benchmarks/peft.py --out benchmarks/results --steps 200

Smoke test on CPU (a tiny model; full, lora, dora; results under /tmp are not measurements):

    PYTHONPATH=src python benchmarks/peft.py --smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# This file is named like the `peft` package: keep its folder off the import path so `import peft` finds the library.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"full": "none", "lora": "lora", "dora": "dora", "qlora": "qlora"}
SHAPE_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, max_position_embeddings=2048)
SHAPE_SMOKE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def synthetic_data(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            f.write(json.dumps({"prompt": f"Question: what is {a} + {b}?\nAnswer: ", "response": str(a + b)}) + "\n")
    return path


def random_llama(folder: Path, shape: dict[str, int], data: Path, vocab: int) -> Path:
    """A random LlamaForCausalLM + a byte-level BPE tokenizer trained on the data, in `folder`."""
    import tokenizers
    import torch
    import transformers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(data)], trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=max(vocab, tok.get_vocab_size()), tie_word_embeddings=False, **shape)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def run_one(method: str, model: Path, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    import hasten
    from hasten.config import load_config

    out = Path(args.workdir) / method
    overrides = [f"model.from={model}", f"data.source={data}", f"peft.method={METHODS[method]}",
                 f"peft.rank={args.rank}", f"peft.alpha={2 * args.rank}", f"train.steps={args.steps}",
                 f"train.batch_size={args.batch_size}", f"train.seq_len={args.seq_len}",
                 f"train.eval_every={args.steps}", "train.eval_batches=4", "log.every=10",
                 f"optim.lr={args.full_lr if method == 'full' else args.lr}", "optim.weight_decay=0.0",
                 "optim.warmup_steps=10", "checkpoint.every=0", "checkpoint.at_end=false", "log.sample_tokens=0",
                 "log.progress=false", "log.plot=false", "log.tensorboard=false", f"train.out_dir={out}"]
    if args.smoke:
        overrides += ["precision.dtype=fp32", "train.threads=2"]
    start = time.perf_counter()
    try:
        summary = hasten.train(load_config("default", overrides))
    except Exception as err:  # e.g. qlora without CUDA or bitsandbytes: recorded, not fatal
        return dict(method=method, error=f"{type(err).__name__}: {err}")
    keys = ("trainable_params", "total_params", "params", "tokens_per_second", "peak_memory_gib", "final_loss",
            "final_val_loss", "wall_time_s", "device", "precision")
    row = {k: summary.get(k) for k in keys}
    row.update(method=method, wall_with_setup_s=time.perf_counter() - start)
    return row


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"# PEFT benchmark ({meta['device']}, {meta['steps']} steps, batch {meta['batch_size']} x "
             f"{meta['seq_len']}, rank {meta['rank']})", "",
             "| method | trainable params | tokens/s | peak GiB | final loss | final val loss |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | not run: {r['error'][:80]} | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['trainable_params'] or r['params']:,} | {r['tokens_per_second']:,.0f} | "
                     f"{r['peak_memory_gib'] or 0:.2f} | {r['final_loss']:.4f} | {r['final_val_loss']:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="", help="HF Llama folder (default: a random 1.1B-shaped Llama)")
    parser.add_argument("--data", default="", help="instruction JSONL (default: synthetic arithmetic)")
    parser.add_argument("--methods", default="full,lora,dora,qlora")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-4, help="adapter learning rate")
    parser.add_argument("--full-lr", type=float, default=2e-5, help="full fine-tuning learning rate")
    parser.add_argument("--out", default="", help="folder for peft.json and peft.md (default: the work folder)")
    parser.add_argument("--workdir", default="/tmp/hasten-bench-peft")
    parser.add_argument("--smoke", action="store_true", help="tiny model, few steps, CPU-friendly; not a measurement")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.batch_size, args.seq_len, args.rank = 6, 4, 48, 4
        args.lr = args.full_lr = 1e-2
        if args.methods == "full,lora,dora,qlora":
            args.methods = "full,lora,dora"
        args.workdir = "/tmp/hasten-bench-peft-smoke"
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else synthetic_data(work / "arith.jsonl", 400 if args.smoke else 20000)
    model = Path(args.model) if args.model else random_llama(
        work / "base", SHAPE_SMOKE if args.smoke else SHAPE_1B, data, 300 if args.smoke else 8192)
    rows = [run_one(m.strip(), model, data, args) for m in args.methods.split(",") if m.strip()]
    device = next((r["device"] for r in rows if "device" in r), "n/a")
    meta = dict(commit=_commit(), host=platform.node(), device=device, steps=args.steps, batch_size=args.batch_size,
                seq_len=args.seq_len, rank=args.rank, model=str(model), data=str(data), smoke=args.smoke)
    out = Path(args.out) if args.out else work
    out.mkdir(parents=True, exist_ok=True)
    (out / "peft.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    (out / "peft.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
