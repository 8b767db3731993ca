"""Where a Mamba-2 mixer's forward+backward time goes (the shapes of `architectures.py` part (a)).

    PYTHONPATH=src python benchmarks/profile_mixer.py --out /tmp/profile-mixer --seq 16384
    PYTHONPATH=src python benchmarks/profile_mixer.py --out /tmp/profile-mixer --ablations

Default: for each chunk length, and for the depthwise convolution as hasten runs it (shifted
multiply-adds) and as `nn.Conv1d` (cuDNN), times a compiled fp+bp of the mixer (median of
`--iters`), then profiles the fastest configuration's GPU kernels, grouped by name, and the CPU op
that launched each one. The attention mixer's time at the same shape is the reference.

--ablations: the default configuration with parts of its backward taken away or inductor options
changed, one at a time: the gradients of the convolution's weights, of the norm weight, of D, of
dt_bias and A_log, of all of these; inductor's mix-order reductions, N-d tiling, tiled and split
reductions. A freeze that saves a lot points at a slow reduction in the generated backward.

Backward starts from a dense random gradient of the output, as in `architectures.py`.
Writes `profile_mixer.json` (or `profile_mixer_ablations.json`) under `--out`.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from architectures import _time_ms  # the same timer as the mixer benchmark (this folder)
from hasten.models import Attention, Mamba2, mamba2, rope_tables

ABLATIONS = [  # (name, parameters whose gradient is not needed, inductor options)
    ("default", (), {}),
    ("no conv weight grad", ("conv1d.",), {}),
    ("no norm weight grad", ("norm_weight",), {}),
    ("no D grad", ("D",), {}),
    ("no dt_bias / A_log grad", ("dt_bias", "A_log"), {}),
    ("no small-parameter grads", ("conv1d.", "norm_weight", "D", "dt_bias", "A_log"), {}),
    ("mix_order_reduction off", (), {"triton.mix_order_reduction": False}),
    ("prefer_nd_tiling", (), {"triton.prefer_nd_tiling": True}),
    ("tile_reductions", (), {"triton.tile_reductions": True}),
    ("split_reductions off", (), {"split_reductions": False}),
]


def _conv1d(x_BTC, weight, bias):
    T, K = x_BTC.shape[1], weight.shape[-1]
    return F.conv1d(x_BTC.transpose(1, 2), weight, bias, padding=K - 1, groups=weight.shape[0])[..., :T].transpose(1, 2)


def _set_inductor(options: dict) -> dict:
    """Apply `options` (dotted names under torch._inductor.config); returns the old values."""
    old = {}
    for key, value in options.items():
        *path, attr = key.split(".")
        obj = inductor_config
        for part in path:
            obj = getattr(obj, part)
        old[key] = getattr(obj, attr)
        setattr(obj, attr, value)
    return old


def kernel_profile(step, iters: int = 5) -> dict:
    """GPU time per call by kernel name, and by the CPU op (with input shapes) that launched it.
    Only kernel events are summed: operator events, and the GPU-side ranges torch.compile records
    around each compiled graph, also carry their kernels' time."""
    for _ in range(2):  # a step compiled before a later torch._dynamo.reset() compiles again here
        step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(iters):
            step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    by_kernel, by_op = defaultdict(float), defaultdict(float)
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            if event.name.startswith("## "):  # a compiled graph's GPU-side range ("## Call CompiledFxGraph"), not a kernel
                continue
            by_kernel[event.name] += event.time_range.elapsed_us() / 1000 / iters
        elif event.kernels:
            for kernel in event.kernels:
                by_op[(event.name, str(event.input_shapes)[:160])] += kernel.duration / 1000 / iters
    total = sum(by_kernel.values())
    return dict(gpu_ms=total,
                top_kernels=[dict(name=name[:140], ms=ms, share=ms / max(total, 1e-9))
                             for name, ms in sorted(by_kernel.items(), key=lambda kv: -kv[1])[:30]],
                top_launchers=[dict(op=op, shapes=shapes, ms=ms)
                               for (op, shapes), ms in sorted(by_op.items(), key=lambda kv: -kv[1])[:20]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/hasten-profile-mixer")
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--chunks", default="64,128", help="chunk lengths to time (default mode)")
    parser.add_argument("--ablations", action="store_true", help="time the ablations at the first chunk length")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny fp32 sizes on the CPU, compiled without code generation: checks the script only")
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        args.seq, args.tokens, args.dim, args.heads, args.warmup, args.iters = 64, 128, 64, 4, 1, 2
        args.chunks = "16"
    batch = max(1, args.tokens // args.seq)
    x = torch.randn(batch, args.seq, args.dim, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    result = dict(seq=args.seq, batch=batch, dim=args.dim, heads=args.heads,
                  device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  torch=torch.__version__, variants=[])

    attention = Attention(args.dim, args.heads).to(device, dtype)
    rope = tuple(t.to(device) for t in rope_tables(args.dim // args.heads, args.seq))

    def attn_step():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION] if device.type == "cuda" else [SDPBackend.MATH]):
            attention(x, rope).backward(grad)
    result["attention_ms"] = _time_ms(attn_step, args.warmup, args.iters, device)
    print(json.dumps(dict(attention_ms=result["attention_ms"])), flush=True)

    def measure(chunk: int, frozen: tuple = (), options: dict | None = None) -> tuple[dict, object]:
        torch._dynamo.reset()
        old = _set_inductor(options or {})
        try:
            mixer = Mamba2(args.dim, d_state=16 if args.smoke else 64, head_dim=2 * args.dim // args.heads, expand=2,
                           chunk_size=chunk).to(device, dtype)
            for name, param in mixer.named_parameters():
                param.requires_grad_(not name.startswith(frozen) if frozen else True)
            compiled = torch.compile(mixer, dynamic=False, backend="aot_eager" if args.smoke else "inductor")

            def step():
                compiled(x).backward(grad)
            row = dict(ms=_time_ms(step, args.warmup, args.iters, device),
                       peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None)
        except Exception as err:  # a compiler failure in one variant is recorded, not fatal
            return dict(error=f"{type(err).__name__}: {str(err)[:300]}"), None
        finally:
            _set_inductor(old)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        row["attention_over_mamba"] = result["attention_ms"] / row["ms"]
        return row, step

    chunks = [int(c) for c in args.chunks.split(",")]
    best = None
    if args.ablations:
        for name, frozen, options in ABLATIONS:
            row, step = measure(chunks[0], frozen, options)
            row = dict(variant=name, chunk=chunks[0], **row)
            print(json.dumps(row), flush=True)
            result["variants"].append(row)
            if name == "default" and step is not None:
                best = (step, row)
    else:
        shift_conv = mamba2.causal_conv
        for conv_name, conv in (("shift", shift_conv), ("conv1d", _conv1d)):
            for chunk in chunks if conv_name == "shift" else chunks[:1]:  # cuDNN's conv at the first chunk only
                mamba2.causal_conv = conv
                try:
                    row, step = measure(chunk)
                finally:
                    mamba2.causal_conv = shift_conv
                row = dict(conv=conv_name, chunk=chunk, **row)
                print(json.dumps(row), flush=True)
                result["variants"].append(row)
                if conv_name == "shift" and step is not None and (best is None or row["ms"] < best[1]["ms"]):
                    best = (step, row)
    if best is not None:
        step, row = best
        result["profiled"] = dict(chunk=row["chunk"], **kernel_profile(step))
        for k in result["profiled"]["top_kernels"]:
            print(f"{k['ms']:8.3f} ms {100 * k['share']:5.1f}%  {k['name']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "profile_mixer_ablations.json" if args.ablations else "profile_mixer.json"
    (out / name).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
