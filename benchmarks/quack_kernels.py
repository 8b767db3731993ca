"""hasten's compiled kernels against QuACK's fused CuTe-DSL kernels on a Hopper GPU, at the gpt2-124m
recipe's shapes (32 x 1024 tokens, width 768, SwiGLU hidden 2048, vocabulary 50,304):

- the SwiGLU feed-forward: hasten's module compiled (cuBLAS GEMMs; the gate in a kernel of
  Inductor's, or with fused=True gate and up as one GEMM and the gate in hasten's Triton kernel)
  against quack.mlp.mlp_func (the gate in the up-projection GEMM's epilogue, its backward in the
  down projection's gradient GEMM), with gate/up rows interleaved or concatenated (--mlp-cases picks);
- the output head with its cross-entropy: hasten.models.ops.cross_entropy.linear_cross_entropy
  (cuBLAS GEMMs, one Triton kernel for loss and logits' gradient) against
  quack.linear_cross_entropy.chunked_linear_cross_entropy (on SM90 its scaled-exp pipeline);
- the plain GEMMs of a step: torch.mm (cuBLAS) against quack.gemm_interface.gemm.

Each forward + backward is timed as its median over --iters calls (CUDA events); each is checked
against the same computation in fp32 (largest error over the tensor's largest value).

    PYTHONPATH=src python benchmarks/quack_kernels.py --out runs/quack-kernels

Needs a CUDA GPU of compute capability 9.0 and the quack-kernels package (with nvidia-cutlass-dsl).
Writes quack_kernels.json under --out after every measurement, so a stopped run keeps what it did, and
quack_kernels.md (its tables) at the end; `--render FILE.json` writes the tables of a results file again.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from architectures import _environment  # this folder's provenance fields

TOKENS, DIM, HIDDEN, VOCAB = 32 * 1024, 768, 2048, 50304


def median_ms(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    return times[len(times) // 2]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-30)).item()


class Results:
    def __init__(self, out: Path, budget_s: float) -> None:
        self.path = out / "quack_kernels.json"
        self.deadline = time.monotonic() + budget_s
        self.data = dict(suite="quack_kernels", **_environment(), shapes=dict(tokens=TOKENS, dim=DIM, hidden=HIDDEN,
                                                                                 vocab=VOCAB), rows=[])

    def time_left(self) -> bool:
        return time.monotonic() < self.deadline

    def add(self, **row) -> None:
        print(json.dumps(row), flush=True)
        self.data["rows"].append(row)
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")


def run_case(results: Results, section: str, name: str, step, grads, ref: dict, args, **extra) -> None:
    """step() runs one forward + backward; grads() returns the tensors to compare with ref."""
    if not results.time_left():
        results.add(section=section, name=name, skipped="time budget spent")
        return
    t0 = time.monotonic()
    try:
        step()  # first call: compilation and autotuning, outside the timing
        torch.cuda.synchronize()
        first_s = time.monotonic() - t0
        errors = {k: round(rel_err(v, ref[k]), 5) for k, v in grads().items()}
        torch.cuda.reset_peak_memory_stats()
        ms = median_ms(step, args.warmup, args.iters)
        results.add(section=section, name=name, ms=round(ms, 4), first_call_s=round(first_s, 1),
                    peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), rel_err=errors, **extra)
    except Exception as exc:  # a failing kernel is a result too
        results.add(section=section, name=name, error=f"{type(exc).__name__}: {str(exc)[:400]}")


def mlp_section(results: Results, args) -> None:
    from quack.mlp import mlp_func

    from hasten.models.layers import SwiGLU

    torch.manual_seed(0)
    ffn = SwiGLU(DIM, HIDDEN).cuda()  # fp32 master weights under bf16 autocast, as the recipe trains
    x = torch.randn(TOKENS, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(TOKENS, DIM, device="cuda", dtype=torch.bfloat16)
    names = ["out", "dx", "dw1", "dw3", "dw2"]

    ref_out = ffn(x.float())
    ref_out.backward(dy.float())
    ref = dict(zip(names, [ref_out.detach()] + [p.grad.clone() for p in (x, ffn.w1.weight, ffn.w3.weight, ffn.w2.weight)]))

    def quack_ffn(x_: torch.Tensor, tuned: bool, concat: bool = False) -> torch.Tensor:
        if concat:  # [W1; W3] as hasten's fused projection makes it; QuACK reads it as interleaved
            w13 = torch.cat((ffn.w1.weight, ffn.w3.weight))
        else:
            w13 = torch.stack((ffn.w1.weight, ffn.w3.weight), dim=1).flatten(0, 1)  # gate and up rows interleaved
        return mlp_func(x_, w13, ffn.w2.weight, activation="swiglu", tuned=tuned, concat_layout=concat)

    fused = SwiGLU(DIM, HIDDEN, fused=True).cuda()  # one matmul for gate and up, the Triton SwiGLU kernel
    fused.load_state_dict(ffn.state_dict())
    fused_grads = [x, fused.w1.weight, fused.w3.weight, fused.w2.weight]
    variants = {"hasten compiled": torch.compile(ffn),
                "hasten fused, compiled": torch.compile(fused),
                "quack untuned": lambda x_: quack_ffn(x_, False),
                "quack untuned, concat": lambda x_: quack_ffn(x_, False, concat=True),
                "quack untuned, compiled": torch.compile(lambda x_: quack_ffn(x_, False)),
                "quack tuned": lambda x_: quack_ffn(x_, True),
                "quack tuned, compiled": torch.compile(lambda x_: quack_ffn(x_, True))}
    for name, fn in variants.items():
        if args.mlp_cases and name not in args.mlp_cases:
            continue
        params = fused_grads if name.startswith("hasten fused") else [x, ffn.w1.weight, ffn.w3.weight, ffn.w2.weight]
        last = {}

        def step(fn=fn, last=last, params=params):
            for p in params:
                p.grad = None
            with torch.autocast("cuda", torch.bfloat16):
                out = fn(x)
            out.backward(dy)
            last["out"] = out

        run_case(results, "swiglu ffn", name, step,
                 lambda last=last, params=params: dict(zip(names, [last["out"].detach()] + [p.grad for p in params])),
                 ref, args)


def head_section(results: Results, args) -> None:
    from quack.linear_cross_entropy import chunked_linear_cross_entropy

    from hasten.models.ops.cross_entropy import linear_cross_entropy

    torch.manual_seed(0)
    w = (0.02 * torch.randn(VOCAB, DIM, device="cuda")).requires_grad_()
    h = torch.randn(TOKENS, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, VOCAB, (TOKENS,), device="cuda")
    ref_loss = torch.nn.functional.cross_entropy(h.float() @ w.t(), t)
    ref_loss.backward()
    ref = dict(loss=ref_loss.detach(), dh=h.grad.clone(), dw=w.grad.clone())

    variants = {"hasten (chunk 32768)": lambda: linear_cross_entropy(h, w, t, 32768)}
    for chunk in args.chunks:
        variants[f"quack (chunk {chunk})"] = lambda chunk=chunk: chunked_linear_cross_entropy(h, w, t, chunk_size=chunk)
    variants["quack base pipeline (chunk 8192)"] = lambda: chunked_linear_cross_entropy(
        h, w, t, chunk_size=8192, use_scaled_exp=False)
    for name, fn in variants.items():
        last = {}

        def step(fn=fn, last=last):
            h.grad = w.grad = None
            with torch.autocast("cuda", torch.bfloat16):
                loss = fn()
            loss.backward()
            last["loss"] = loss

        run_case(results, "head + cross-entropy", name, step,
                 lambda last=last: dict(loss=last["loss"].detach(), dh=h.grad, dw=w.grad), ref, args)


def gemm_section(results: Results, args) -> None:
    from quack.gemm_interface import gemm

    torch.manual_seed(0)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    for k, n, layer in [(DIM, DIM, "attention projection"), (DIM, HIDDEN, "gate / up"), (HIDDEN, DIM, "down"),
                        (DIM, VOCAB, "head")]:
        x = torch.randn(TOKENS, k, **bf16)
        w = torch.randn(n, k, **bf16) / k ** 0.5
        dy = torch.randn(TOKENS, n, **bf16)
        for gemm_name, a, b in [("fwd x @ W^T", x, w.t()), ("dX dY @ W", dy, w), ("dW dY^T @ x", dy.t(), x)]:
            ref = dict(out=a.float() @ b.float())
            flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
            for lib, fn in [("cublas", lambda a=a, b=b: torch.mm(a, b)),
                            ("quack untuned", lambda a=a, b=b: gemm(a, b, tuned=False)),
                            ("quack tuned", lambda a=a, b=b: gemm(a, b, tuned=True))]:
                last = {}

                def step(fn=fn, last=last):
                    last["out"] = fn()

                run_case(results, "gemm", f"{layer}: {gemm_name}: {lib}", step, lambda last=last: dict(out=last["out"]),
                         ref, args, tflop=round(flops / 1e12, 3))
                row = results.data["rows"][-1]
                if "ms" in row:
                    row["tflops"] = round(flops / row["ms"] / 1e9, 1)
            del ref


def markdown(data: dict) -> str:
    """The results as tables, one per section (what quack_kernels.md holds)."""
    lines = [f"# QuACK's fused kernels against hasten's ({data['device']}, torch {data['torch']}, quack {data['quack']})", "",
             f"{data['shapes']['tokens']} tokens, width {data['shapes']['dim']}, SwiGLU hidden {data['shapes']['hidden']}, "
             f"vocabulary {data['shapes']['vocab']}; forward + backward (a GEMM alone for the gemm section), median ms. "
             "Error: largest |difference| over largest |value| against fp32.", ""]
    for section in dict.fromkeys(r["section"] for r in data["rows"]):
        rows = [r for r in data["rows"] if r["section"] == section]
        lines += [f"## {section}", "", "| case | ms | TFLOP/s | first call s | peak GiB | largest error |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            if "ms" not in r:
                lines.append(f"| {r['name']} | {r.get('error') or r.get('skipped')} | | | | |")
                continue
            err = max(r["rel_err"].values())
            lines.append(f"| {r['name']} | {r['ms']:.3f} | {r.get('tflops', '')} | {r['first_call_s']} | "
                         f"{r['peak_gib']} | {err:.4f} |")
        lines.append("")
    if data.get("note"):
        lines += [data["note"], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="mlp,head,gemm")
    parser.add_argument("--chunks", type=lambda s: [int(c) for c in s.split(",")], default=[4096, 8192, 16384])
    parser.add_argument("--mlp-cases", type=lambda s: s.split(";"), default=None,
                        help="only these cases of the mlp section, separated by semicolons (default: all)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--budget-seconds", type=float, default=480)
    parser.add_argument("--out", default="runs/quack-kernels")
    parser.add_argument("--render", metavar="JSON", help="only write the tables of a results file (no GPU needed)")
    args = parser.parse_args()
    if args.render:
        path = Path(args.render)
        path.with_suffix(".md").write_text(markdown(json.loads(path.read_text())))
        return
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        raise SystemExit("quack_kernels.py needs a CUDA GPU of compute capability 9.0 (Hopper)")
    import quack

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = Results(out, args.budget_seconds)
    results.data["quack"] = getattr(quack, "__version__", "unknown")
    sections = dict(mlp=mlp_section, head=head_section, gemm=gemm_section)
    for section in args.sections.split(","):
        sections[section](results, args)
    results.path.with_suffix(".md").write_text(markdown(results.data))
    print(f"wrote {results.path} and its .md")


if __name__ == "__main__":
    main()
