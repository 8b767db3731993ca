"""LoRA / QLoRA fine-tuning throughput and memory on one GPU: hasten vs Hugging Face Trainer + peft.

The model is a Llama of the TinyLlama-1.1B shape (22 layers, d 2048, 32 heads / 4 KV heads, FFN
5632, vocabulary 32000), randomly initialized and saved once as a Hugging Face folder with bf16
weights and a 32000-token BPE trained on the embedded corpus. Both sides fine-tune it from that
folder on the same token stream (the embedded corpus, windows of 2048 tokens, batch 8), with the
same adapters (LoRA r16, alpha 32, dropout 0, on every linear of every block: q k v o gate up
down), AdamW (fused) at 2e-4 and bf16:

  hasten:lora   `hasten.train` with model.from=FOLDER peft.method=lora (compile on, frozen base in bf16)
  hf:lora       `transformers.Trainer` on LlamaForCausalLM loaded in bf16 + `peft.get_peft_model`,
                bf16=True, optim=adamw_torch_fused (the usual HF + peft recipe; no gradient
                checkpointing on either side)
  hasten:qlora  the base linears in NF4 (bitsandbytes), adapters as above
  hf:qlora      BitsAndBytesConfig(load_in_4bit, nf4, bf16 compute) + prepare_model_for_kbit_training
                (without its gradient checkpointing, as on hasten's side)
  hasten:dora   peft.method=dora (LoRA plus a learned magnitude per output row, compiled as on LoRA)
  hf:dora       as hf:lora with LoraConfig(use_dora=True)

Each side runs in its own subprocess (memory peaks and compile caches stay apart). Throughput is
timed after warm-up steps (compilation excluded), between two synchronizations; peak memory is
`torch.cuda.max_memory_allocated` of the side's process. Each side checks its loss is finite and
falling. Writes peft.json (summary.tokens_per_second_ratio_vs_hf, summary.peak_memory_ratio_vs_hf,
and the QLoRA and DoRA ratios when both sides of those ran) and peft.md:

    PYTHONPATH=src python benchmarks/peft_finetune.py --out benchmarks/results

Smoke test on CPU (a tiny Llama, fp32, LoRA sides only; not a measurement):

    PYTHONPATH=src python benchmarks/peft_finetune.py --smoke
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, max_position_embeddings=2048, vocab_size=32000)
SHAPE_SMOKE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128, vocab_size=512)
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIDES = ["hasten:lora", "hf:lora", "hasten:qlora", "hf:qlora"]  # also hasten:dora, hf:dora


def _data_overrides(args: argparse.Namespace) -> list[str]:
    return ["data.source=stdlib", f"data.max_documents={args.max_documents}", f"data.cache_dir={args.workdir}/cache"]


def make_model(args: argparse.Namespace) -> Path:
    """The random Llama folder (bf16 safetensors + a BPE trained on the corpus), written once."""
    import torch
    import transformers

    from hasten.config import load_config
    from hasten.data.sources import load_documents, split_documents
    from hasten.data.tokenizer import train_bpe

    folder = Path(args.workdir) / "base"
    if (folder / "config.json").is_file():
        return folder
    shape = SHAPE_SMOKE if args.smoke else SHAPE_1B
    data_cfg = load_config("default", _data_overrides(args)).data
    train_docs, _ = split_documents(load_documents(data_cfg), data_cfg.val_fraction)
    tokenizer = train_bpe(train_docs, shape["vocab_size"])
    tmp = folder.with_name("base.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tokenizer.save(tmp)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(tie_word_embeddings=False, eos_token_id=tokenizer.eot_id,
                                   **{**shape, "vocab_size": tokenizer.vocab_size})
    model = transformers.LlamaForCausalLM(cfg).to(torch.float32 if args.smoke else torch.bfloat16)
    model.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def _check_loss(losses: list[float]) -> None:
    third = max(1, len(losses) // 3)
    if not losses or not all(math.isfinite(x) for x in losses) or not sum(losses[-third:]) < sum(losses[:third]):
        raise SystemExit(f"loss is not finite and falling: {losses[:3]} ... {losses[-3:]}")


def run_hasten(method: str, model: Path, args: argparse.Namespace) -> dict:
    import hasten
    from hasten.config import load_config
    from hasten.train.log import read_log

    out = Path(args.workdir) / f"hasten_{method}"
    steps = args.warmup + args.steps
    overrides = [f"model.from={model}", *_data_overrides(args), f"peft.method={method}", f"peft.rank={args.rank}",
                 f"peft.alpha={2 * args.rank}", "peft.dropout=0.0", "peft.targets=all-linear",
                 f"train.steps={steps}", f"train.batch_size={args.batch_size}", f"train.seq_len={args.seq_len}",
                 "train.eval_every=0", "train.eval_batches=1", f"log.every={args.log_every}", f"optim.lr={args.lr}",
                 "optim.weight_decay=0.0", f"optim.warmup_steps={args.warmup}", "checkpoint.every=0",
                 "checkpoint.at_end=false", "log.sample_tokens=0", "log.progress=false", "log.plot=false",
                 "log.tensorboard=false", f"train.out_dir={out}"]
    overrides += ["precision.dtype=fp32", "train.compile=false", "train.threads=2"] if args.smoke else \
        ["precision.dtype=bf16", "train.compile=true"]
    overrides += args.hasten_overrides.split()
    summary = hasten.train(load_config("default", overrides))
    losses = [r["loss"] for r in read_log(out / "metrics.jsonl") if r["event"] == "train"]
    _check_loss(losses)
    return dict(side=f"hasten:{method}", tokens_per_second=summary["tokens_per_second"],
                peak_memory_gib=summary["peak_memory_gib"], trainable_params=summary["trainable_params"],
                total_params=summary["total_params"], first_loss=losses[0], final_loss=losses[-1],
                step_ms=1000 * args.batch_size * args.seq_len / summary["tokens_per_second"])


def run_hf(method: str, model_dir: Path, args: argparse.Namespace) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from hasten.config import load_config
    from hasten.data import prepare_data

    cuda = torch.cuda.is_available()
    data = prepare_data(load_config("default", [*_data_overrides(args), f"data.tokenizer={model_dir}"]).data)
    tokens = torch.from_numpy(data.train.astype("int64"))
    steps, seq, batch = args.warmup + args.steps, args.seq_len, args.batch_size

    class Windows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return steps * batch

        def __getitem__(self, i: int) -> dict:
            g = torch.Generator().manual_seed(i)
            s = int(torch.randint(0, len(tokens) - seq - 1, (1,), generator=g))
            ids = tokens[s: s + seq + 1]  # labels shift inside the model: seq predicted tokens, as on hasten's side
            return {"input_ids": ids, "labels": ids}

    marks: dict[str, float] = {}
    losses: list[float] = []

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    class Clock(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            if state.global_step == args.warmup:
                sync()
                marks["start"] = time.perf_counter()

        def on_log(self, targs, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

        def on_train_end(self, targs, state, control, **kw):
            sync()
            marks["end"] = time.perf_counter()

    kwargs: dict = dict(dtype=torch.bfloat16 if cuda else torch.float32, attn_implementation="sdpa")
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model = LlamaForCausalLM.from_pretrained(model_dir, **kwargs)
    if cuda:
        model = model.cuda() if method != "qlora" else model
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                             target_modules=HF_TARGETS, bias="none", task_type="CAUSAL_LM",
                                             use_dora=method == "dora"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    targs = TrainingArguments(output_dir=f"{args.workdir}/hf_{method}", per_device_train_batch_size=batch,
                              max_steps=steps, learning_rate=args.lr, weight_decay=0.0, warmup_steps=args.warmup,
                              bf16=cuda, optim="adamw_torch_fused" if cuda else "adamw_torch",
                              logging_steps=args.log_every, save_strategy="no", report_to=[],
                              dataloader_num_workers=4 if cuda else 0, max_grad_norm=1.0, disable_tqdm=True,
                              use_cpu=not cuda)
    Trainer(model=model, args=targs, train_dataset=Windows(), callbacks=[Clock()]).train()
    _check_loss(losses)
    step_ms = 1000 * (marks["end"] - marks["start"]) / args.steps
    return dict(side=f"hf:{method}", tokens_per_second=batch * seq / (step_ms / 1000), step_ms=step_ms,
                peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                trainable_params=trainable, total_params=total, first_loss=losses[0], final_loss=losses[-1])


def _environment() -> dict:
    import torch

    from hasten.provenance import source_commit

    commit = source_commit()
    cuda = torch.cuda.is_available()
    return dict(date=time.strftime("%Y-%m-%d"), commit=commit, torch=torch.__version__,
                device=torch.cuda.get_device_name(0) if cuda else "cpu")


def summarize(rows: list[dict]) -> dict:
    by = {r["side"]: r for r in rows if "error" not in r}
    summary: dict = {}
    for method, suffix in (("lora", ""), ("qlora", "_qlora"), ("dora", "_dora")):
        h, f = by.get(f"hasten:{method}"), by.get(f"hf:{method}")
        if h and f:
            summary[f"tokens_per_second_ratio_vs_hf{suffix}"] = h["tokens_per_second"] / f["tokens_per_second"]
            if h["peak_memory_gib"] and f["peak_memory_gib"]:
                summary[f"peak_memory_ratio_vs_hf{suffix}"] = h["peak_memory_gib"] / f["peak_memory_gib"]
    return summary


def _number(value: float | list[float]) -> str:
    return ", ".join(f"{v:.3f}" for v in value) if isinstance(value, list) else f"{value:.3f}"


def markdown(result: dict) -> str:
    lines = [f"# LoRA / QLoRA / DoRA fine-tuning: hasten vs HF Trainer + peft ({result['device']}, torch {result['torch']})",
             "", f"Llama {result['shape']['num_hidden_layers']} layers, d {result['shape']['hidden_size']}, random init,"
             f" {'fp32' if result['smoke'] else 'bf16'} weights; LoRA r{result['rank']} alpha {2 * result['rank']} on all linears; batch "
             f"{result['batch_size']} x seq {result['seq_len']}; {result['steps']} timed steps after "
             f"{result['warmup']} warm-up steps.", "",
             "| side | tokens/s | peak GiB | step ms | trainable / total params | loss first -> last |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['side']} | not run: {r['error'].strip().splitlines()[-1][:120]} | | | | |")
            continue
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        lines.append(f"| {r['side']} | {r['tokens_per_second']:,.0f} | {mem} | {r['step_ms']:.0f} | "
                     f"{r['trainable_params']:,} / {r['total_params']:,} | {r['first_loss']:.3f} -> "
                     f"{r['final_loss']:.3f} |")
    lines.append("")
    lines += [f"- {key}: **{_number(value)}**" for key, value in result["summary"].items()]
    if result.get("note"):
        lines += ["", result["note"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", default=",".join(SIDES), help="side:method, comma-separated")
    parser.add_argument("--only", help="run this one side in this process (used internally)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up steps (compilation happens here)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--lr", type=float, default=2e-4, help="adapter learning rate (both sides)")
    parser.add_argument("--hasten-overrides", default="", help="extra key=value overrides of hasten's sides, "
                        "space-separated (e.g. 'parallel.activation_checkpointing=budget')")
    parser.add_argument("--max-documents", type=int, default=4000, help="corpus files used (enough windows)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds allowed to one side")
    parser.add_argument("--workdir", default="/tmp/hasten-bench-peft")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--smoke", action="store_true", help="tiny fp32 model on the CPU; checks the script only")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.warmup, args.batch_size, args.seq_len, args.rank, args.log_every = 6, 3, 2, 64, 4, 1
        args.lr = 1e-2
        args.max_documents, args.workdir = 60, "/tmp/hasten-bench-peft-smoke"
        args.out = args.out if "--out" in sys.argv else f"{args.workdir}/out"
        if "--sides" not in sys.argv:
            args.sides = "hasten:lora,hf:lora"
    if args.only:  # the sides' subprocesses get the parent's arguments, smoke settings applied again
        side, method = args.only.split(":")
        model = Path(args.workdir) / "base"
        print("RESULT " + json.dumps((run_hasten if side == "hasten" else run_hf)(method, model, args)), flush=True)
        return
    model = make_model(args)
    rows: list[dict] = []
    for item in args.sides.split(","):
        cmd = [sys.executable, __file__, "--only", item, *sys.argv[1:]]
        cmd = [c for i, c in enumerate(cmd) if not (c == "--sides" or (i and cmd[i - 1] == "--sides"))]
        start = time.perf_counter()
        log = Path(args.workdir) / "logs" / f"{item.replace(':', '_')}.log"  # the side's whole output, kept
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as stream:
            try:
                returncode = subprocess.run(cmd, stdout=stream, stderr=subprocess.STDOUT,
                                            timeout=args.timeout).returncode
            except subprocess.TimeoutExpired:
                returncode = None
        output = log.read_text(errors="replace")
        found = [line for line in output.splitlines() if line.startswith("RESULT ")]
        error = None
        if returncode is None:
            error = f"timed out after {args.timeout} s; the end of its output ({log}):\n{output[-3000:]}"
        elif not found or returncode:
            error = output[-4500:]
        if error:
            print(f"{item} failed:\n{error}", flush=True)
            rows.append(dict(side=item, error=error))
        else:
            rows.append(dict(json.loads(found[-1][len("RESULT "):]), wall_s=time.perf_counter() - start))
            print(json.dumps(rows[-1]), flush=True)
        result = dict(suite="peft", **_environment(), smoke=args.smoke, shape=SHAPE_SMOKE if args.smoke else SHAPE_1B,
                      rank=args.rank, batch_size=args.batch_size, seq_len=args.seq_len, steps=args.steps,
                      warmup=args.warmup, rows=rows, summary=summarize(rows))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "peft.json").write_text(json.dumps(result, indent=1))
        (out / "peft.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
