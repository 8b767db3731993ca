"""Post-training quantization of one trained run at several schemes: the validation loss of each.

    hasten train default train.steps=300 train.out_dir=runs/float
    PYTHONPATH=src python benchmarks/ptq_schemes.py runs/float --schemes int8w:0,int8w:32,int4w:32

Each scheme quantizes a fresh copy of the run's float weights (`hasten.methods.qat.convert` with
`qat.scheme` and `qat.group_size`, as `hasten train ... qat.fake_quant=false` does at the end) and
evaluates it on the run's validation batches. Prints one line per scheme (and the float loss first).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hasten.config import QatConfig, load_config
from hasten.methods import qat
from hasten.train.build import build_run
from hasten.train.export import load_trained
from hasten.train.loop import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--schemes", default="int8w:0,int8w:32,int8da-int8w:0,int8da-int8w:32,int8da-int4w:32,int4w:32",
                        help="scheme:group_size, comma-separated (group size 0: one scale per row)")
    args = parser.parse_args()
    run_dir = Path(args.run_dir)
    cfg = load_config(run_dir / "config.toml", ["train.compile=false", f"train.out_dir={run_dir / 'ptq_eval'}",
                                                "qat.scheme=none", "log.tensorboard=false",
                                                "train.device=cpu"])  # where the models below are loaded
    run = build_run(cfg)  # the validation batches and loss of the run
    for spec in ["float:0", *args.schemes.split(",")]:
        scheme, group = spec.split(":")
        model, _, _ = load_trained(run_dir, "cpu")
        if scheme != "float":
            qat.convert(model, QatConfig(scheme=scheme, group_size=int(group)))
        run.model = model.eval()
        loss = evaluate(run, lambda batch: run.loss_fn(run.model, batch))
        print(f"{scheme:<14} group {group:>3}  val loss {loss:.4f}", flush=True)


if __name__ == "__main__":
    main()
