"""Where a Mamba-2 mixer's forward+backward time goes, and how it moves with the chunk length and
the convolution's implementation (the shapes of `architectures.py` part (a)).

    PYTHONPATH=src python benchmarks/profile_mixer.py --out /tmp/profile-mixer --seq 16384

For each chunk length, and for the depthwise convolution as hasten runs it (shifted multiply-adds)
and as `nn.Conv1d` (cuDNN), times a compiled fp+bp of the mixer (median of `--iters`), then
profiles the default configuration's kernels, grouped by name, with the attention mixer's time at
the same shape for reference. Writes `profile_mixer.json` under `--out`.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from architectures import _time_ms  # the same timer as the mixer benchmark (this folder)
from hasten.models import Attention, Mamba2, mamba2, rope_tables


def _conv1d(x_BTC, weight, bias):
    T, K = x_BTC.shape[1], weight.shape[-1]
    return F.conv1d(x_BTC.transpose(1, 2), weight, bias, padding=K - 1, groups=weight.shape[0])[..., :T].transpose(1, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/hasten-profile-mixer")
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--chunks", default="64,128,256")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    batch = max(1, args.tokens // args.seq)
    x = torch.randn(batch, args.seq, args.dim, device=device, dtype=dtype, requires_grad=True)
    result = dict(seq=args.seq, batch=batch, dim=args.dim, heads=args.heads, device=torch.cuda.get_device_name(),
                  torch=torch.__version__, variants=[])

    attention = Attention(args.dim, args.heads).to(device, dtype)
    rope = tuple(t.to(device) for t in rope_tables(args.dim // args.heads, args.seq))

    def attn_step():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            attention(x, rope).sum().backward()
    result["attention_ms"] = _time_ms(attn_step, args.warmup, args.iters, device)
    print(json.dumps(dict(attention_ms=result["attention_ms"])), flush=True)

    shift_conv = mamba2.causal_conv
    best = None
    chunks = [int(c) for c in args.chunks.split(",")]
    for conv_name, conv in (("shift", shift_conv), ("conv1d", _conv1d)):
        for chunk in chunks if conv_name == "shift" else chunks[:1]:  # cuDNN's conv at the first chunk only
            mamba2.causal_conv = conv
            torch._dynamo.reset()
            mixer = Mamba2(args.dim, d_state=64, head_dim=2 * args.dim // args.heads, expand=2,
                           chunk_size=chunk).to(device, dtype)
            compiled = torch.compile(mixer)

            def step(compiled=compiled):
                compiled(x).sum().backward()
            try:
                row = dict(conv=conv_name, chunk=chunk, ms=_time_ms(step, args.warmup, args.iters, device),
                           peak_gib=torch.cuda.max_memory_allocated() / 2**30)
            except Exception as err:  # a compiler failure at one shape is recorded, not fatal
                result["variants"].append(dict(conv=conv_name, chunk=chunk, error=f"{type(err).__name__}: {str(err)[:300]}"))
                print(json.dumps(result["variants"][-1]), flush=True)
                continue
            torch.cuda.reset_peak_memory_stats()
            row["attention_over_mamba"] = result["attention_ms"] / row["ms"]
            print(json.dumps(row), flush=True)
            result["variants"].append(row)
            if conv_name == "shift" and (best is None or row["ms"] < best[1]["ms"]):
                best = (step, row)
    mamba2.causal_conv = shift_conv

    step, row = best
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    kernels = defaultdict(float)
    for event in prof.key_averages():
        if event.device_time_total > 0:
            kernels[event.key] += event.device_time_total / 1000 / 5
    total = sum(kernels.values())
    result["profiled"] = dict(chunk=row["chunk"], gpu_ms=total, top_kernels=[
        dict(name=name[:140], ms=ms, share=ms / total)
        for name, ms in sorted(kernels.items(), key=lambda kv: -kv[1])[:30]])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_mixer.json").write_text(json.dumps(result, indent=1))
    for k in result["profiled"]["top_kernels"]:
        print(f"{k['ms']:8.3f} ms {100 * k['share']:5.1f}%  {k['name']}")


if __name__ == "__main__":
    main()
