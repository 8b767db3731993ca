"""The `hasten` command: train, finetune, distill, nas, generate, export, recipes, bench."""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from hasten.bench.cli import add_parser as add_bench_parser
from hasten.bench.cli import run as run_bench
from hasten.config import ConfigError, field_help, load_config


def _fields_epilog() -> str:
    lines = ["config fields (set in a recipe's [section] or as section.field=value):", ""]
    for key, kind, default, help_text in field_help():
        lines.append(f"  {key} ({kind}, default {default!r})")
        lines.extend(textwrap.wrap(help_text, width=92, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hasten", description="Cheaper training, measured on your own hardware.")
    sub = parser.add_subparsers(dest="command", required=True)
    _recipe_command(sub, "train", "train a model from a recipe",
                    "Train from a TOML recipe (a file, or a shipped name such as default or gpt2-124m), with "
                    "section.field=value overrides.")
    _recipe_command(sub, "finetune", "fine-tune a pretrained model (model.from=PATH), LoRA by default",
                    "Like train, starting from model.from=PATH (a Hugging Face Llama, Mistral or Qwen2 folder, or a "
                    "hasten run/export) with fine-tuning defaults: " + " ".join(FINETUNE_DEFAULTS) + " (a recipe or "
                    "an override wins). data.source may be JSONL with prompt/response records or chat 'messages' "
                    "(loss on responses only; records packed per data.pack).")
    _recipe_command(sub, "distill", "train a (smaller) student on a frozen teacher's predictions (distill.teacher=PATH)",
                    "Like train, with distill.teacher=PATH (a hasten run, checkpoint or export, or a Hugging Face "
                    "Llama-family folder): the loss mixes cross-entropy with the KL divergence from the teacher's "
                    "softened predictions (distill.alpha, distill.temperature), and the data is read with the "
                    "teacher's tokenizer. Defaults: " + " ".join(DISTILL_DEFAULTS) + " (a recipe or an override wins).")
    _recipe_command(sub, "nas", "search each layer's mixer (attention or Mamba-2) and FFN (dense or MoE) for quality "
                    "at low inference latency (differentiable, latency-aware)",
                    "First-order DARTS over each layer's mixer among nas.candidates (and FFN among "
                    "nas.ffn_candidates), with the expected latency, measured on this device, in the architecture's "
                    "loss (nas.latency_weight). Writes nas.json with the derived model.mixers (and model.ffns) "
                    "pattern. Defaults: " + " ".join(NAS_DEFAULTS) + " (a recipe or an override wins).")
    gen = sub.add_parser("generate", help="sample text from a run, checkpoint or export folder")
    gen.add_argument("path")
    gen.add_argument("--prompt", default="def ")
    gen.add_argument("--tokens", type=int, default=200, help="new tokens to sample")
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int, default=50)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="auto")
    gen.add_argument("--quantized", action="store_true", help="sample from the quantized model of a qat.scheme run "
                     "(its quantized.pt) instead of the float weights")
    exp = sub.add_parser("export", help="write a run's weights as safetensors + config + tokenizer")
    exp.add_argument("path")
    exp.add_argument("--out", default=None, help="output folder (default: RUN/export, or RUN/export-hf)")
    exp.add_argument("--merge", action="store_true", help="merge LoRA/DoRA adapters into the base weights "
                     "(the default for a PEFT run)")
    exp.add_argument("--adapter-only", action="store_true", help="a PEFT run from a Hugging Face model.from: write "
                     "its adapters alone in peft's format (with --format hf), for PeftModel.from_pretrained")
    exp.add_argument("--format", default="hasten", choices=("hasten", "hf"),
                     help="hasten (any hasten model) or hf (a Llama folder transformers loads)")
    sub.add_parser("recipes", help="list the shipped recipes")
    add_bench_parser(sub)
    return parser


def _split_recipe(args: list[str]) -> tuple[str | None, list[str]]:
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def _cmd_train(ns: argparse.Namespace) -> int:
    """Train; under `torchrun --nproc-per-node N -m hasten train ...` every rank runs this, rank 0 reports."""
    recipe, overrides = _split_recipe(ns.args)
    config = load_config(recipe, overrides)  # a bad key or value fails here, before torch is imported

    from torch.distributed.elastic.multiprocessing.errors import record

    from hasten.api import train
    from hasten.parallel.env import exit_rank, rank_and_world, shutdown_distributed

    # On an exception this rank leaves at once, without the barrier and teardown below: the other ranks may
    # be inside a collective it will never join, and a barrier would wait for them as they wait for it, until
    # the group's timeout. torchrun stops the other ranks when this one exits.
    summary = record(train)(config)  # record: torchrun's failure report carries this rank's traceback
    if rank_and_world()[0] == 0:
        _print_summary(summary, config.train.out_dir)
    if shutdown_distributed():
        exit_rank()  # logs, checkpoints and summary are closed by now
    return 0


# What `hasten finetune` sets unless the recipe or an override does.
FINETUNE_DEFAULTS = ("peft.method=lora", "optim.lr=2e-4", "optim.weight_decay=0.0", "optim.warmup_steps=10",
                     "train.steps=200", "train.batch_size=8", "train.eval_every=50", "checkpoint.every=0",
                     "log.sample_tokens=0", "train.out_dir=runs/finetune")


def _with_defaults(args: list[str], defaults: tuple[str, ...]) -> tuple[str | None, list[str], set[str]]:
    """(recipe, overrides, keys the user set): `defaults` fill only what the recipe and the
    user's overrides leave unset, and come before the user's overrides."""
    from hasten.config import explicit_keys

    recipe, overrides = _split_recipe(args)
    given = explicit_keys(recipe, overrides)
    return recipe, [d for d in defaults if d.split("=", 1)[0] not in given] + overrides, given


def _train_with(ns: argparse.Namespace, required: str, missing: str, defaults: tuple[str, ...]) -> int:
    """`hasten train` that needs the user to set `required`, with `defaults` (`_with_defaults`)."""
    recipe, overrides, given = _with_defaults(ns.args, defaults)
    if required not in given:
        raise ConfigError(missing)
    ns.args = ([recipe] if recipe else []) + overrides
    return _cmd_train(ns)


def _cmd_finetune(ns: argparse.Namespace) -> int:
    return _train_with(ns, "model.from_path", "hasten finetune needs model.from=PATH (a Hugging Face Llama folder "
                       "or a hasten run).", FINETUNE_DEFAULTS)


# What `hasten distill` sets unless the recipe or an override does.
DISTILL_DEFAULTS = ("train.out_dir=runs/distill",)


def _cmd_distill(ns: argparse.Namespace) -> int:
    from hasten.config import explicit_keys

    # The teacher is compared on whole logits: a chunked loss the recipe sets (gpt2-124m) is turned off;
    # one the user's overrides set meets the config's error.
    if "train.loss_chunk" not in explicit_keys(None, _split_recipe(ns.args)[1]):
        ns.args = [*ns.args, "train.loss_chunk=0"]
    return _train_with(ns, "distill.teacher", "hasten distill needs distill.teacher=PATH (a hasten run, checkpoint "
                       "or export, or a Hugging Face model folder).", DISTILL_DEFAULTS)


# What `hasten nas` sets unless the recipe or an override does.
NAS_DEFAULTS = ("train.out_dir=runs/nas",)


def _cmd_nas(ns: argparse.Namespace) -> int:
    from hasten.nas import search

    recipe, overrides, _ = _with_defaults(ns.args, NAS_DEFAULTS)
    search(load_config(recipe, overrides))
    return 0


def _recipe_command(sub: Any, name: str, help_text: str, description: str) -> None:
    """A subcommand that takes a recipe and key=value overrides, the config fields listed in its help."""
    cmd = sub.add_parser(name, help=help_text, description=description, epilog=_fields_epilog(),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    cmd.add_argument("args", nargs="*", metavar="RECIPE | key=value", help="recipe first (optional), then overrides")


def _rank_prefix() -> str:
    """'rank R/N: ' in a multi-process launch, so that each rank's error says which rank it is."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"rank {os.environ.get('RANK', '0')}/{world}: " if world > 1 else ""


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return "n/a" if value is None else str(value)


def _print_summary(summary: dict, out_dir: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"run {out_dir}", show_header=False)
    for key in ("steps", "tokens", "wall_time_s", "final_loss", "final_val_loss", "unigram_val_loss",
                "tokens_per_second", "mfu", "peak_memory_gib", "skipped_steps", "params", "trainable_params",
                "teacher_params", "precision", "device"):
        if key in summary:
            table.add_row(key, _fmt(summary[key]))
    if summary.get("loss_kernel"):  # what ran the output head and loss (train.loss_chunk on)
        table.add_row("loss_kernel", summary["loss_kernel"])
    console.print(table)
    if summary.get("stop_reason"):
        console.print(f"[yellow]{summary['stop_reason']}[/yellow]")
    if summary.get("sample"):
        console.print("[bold]sample:[/bold]")
        console.print(summary["sample"], markup=False, highlight=False)
    # soft_wrap: the paths are printed whole (rich would fold a long path across lines), for copying
    console.print(f"loss curve: {out_dir}/loss.png   metrics: {out_dir}/metrics.jsonl   "
                  f"summary: {out_dir}/summary.json", soft_wrap=True)


def _cmd_generate(ns: argparse.Namespace) -> int:
    from hasten.api import generate_text

    print(generate_text(ns.path, ns.prompt, ns.tokens, ns.temperature, ns.top_k, ns.seed, ns.device,
                        quantized=ns.quantized))
    return 0


def _cmd_export(ns: argparse.Namespace) -> int:
    from hasten.api import export

    if ns.adapter_only and ns.merge:
        raise ConfigError("--merge and --adapter-only exclude each other: choose merged weights or the adapters.")
    print(export(ns.path, ns.out, merge=not ns.adapter_only, format=ns.format))
    return 0


def _cmd_recipes(ns: argparse.Namespace) -> int:
    import importlib.resources

    for item in sorted((importlib.resources.files("hasten") / "recipes").iterdir(), key=lambda p: p.name):
        if item.name.endswith(".toml"):
            first = item.read_text().splitlines()[0].lstrip("# ")
            print(f"{item.name.removesuffix('.toml'):<12} {first}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    handler = {"train": _cmd_train, "finetune": _cmd_finetune, "distill": _cmd_distill, "nas": _cmd_nas,
               "generate": _cmd_generate,
               "export": _cmd_export, "recipes": _cmd_recipes, "bench": run_bench}
    try:
        return handler[ns.command](ns)
    except ConfigError as err:
        print(f"hasten: error: {_rank_prefix()}{err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:  # the OS's (strerror: filename) or hasten's own sentence
        message = f"{err.strerror}: {err.filename}" if err.filename else str(err)
        print(f"hasten: error: {_rank_prefix()}{message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
