"""fastattn.conv2d vs torch (oneDNN on CPU, cuDNN on GPU): same run, same shapes.

    python benchmarks/bench_conv2d.py [--device cpu|cuda] [--dtype float32] [--quick] [--reps N]

Layers: the seed CNN's first conv (N=64, 3->32, 3x3, 64x64) and its fused conv+ReLU+maxpool block,
ResNet 3x3 layers, depthwise 3x3 and 7x7, a 1x1; forward and forward+backward. Prints a
markdown table (GFLOP/s, ratio ours/torch) and writes it with a PNG under benchmarks/out/.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastattn.ops.conv2d import conv2d, conv2d_relu_maxpool2d  # noqa: E402

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")

# name, N, C, H, K, kernel, stride, padding, groups
LAYERS = [
    ("seed 3->32 3x3 @64", 64, 3, 64, 32, 3, 1, 1, 1),
    ("3x3 64->64 @56", 32, 64, 56, 64, 3, 1, 1, 1),
    ("3x3 128->128 @28", 32, 128, 28, 128, 3, 1, 1, 1),
    ("3x3 256->256 @14", 32, 256, 14, 256, 3, 1, 1, 1),
    ("dw 3x3 128 @56", 32, 128, 56, 128, 3, 1, 1, 128),
    ("dw 7x7 96 @56", 32, 96, 56, 96, 7, 1, 3, 96),
    ("1x1 64->256 @56", 32, 64, 56, 256, 1, 1, 0, 1),
]


def flops(N, C, H, K, k, stride, pad, groups):
    P = (H + 2 * pad - k) // stride + 1
    return 2.0 * N * K * P * P * (C // groups) * k * k


def timeit(fn, reps, device):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    fn()
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def fwd_bwd(f, x, w, b):
    def run():
        for t in (x, w, b):
            t.grad = None
        f(x, w, b).sum().backward()
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or float16 (GPU default), bfloat16")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="quarter batch, 3 reps")
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--only", default=None, help="substring of the layer names to run")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    reps = 3 if args.quick else args.reps
    channels_last = device.type == "cuda"
    rows = []
    for name, N, C, H, K, k, stride, pad, groups in LAYERS:
        if args.only and args.only not in name:
            continue
        if args.quick:
            N = max(1, N // 4)
        torch.manual_seed(0)
        x = torch.randn(N, C, H, H, device=device, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        w = torch.randn(K, C // groups, k, k, device=device, dtype=dtype) * (1.0 / (C // groups * k * k) ** 0.5)
        b = torch.randn(K, device=device, dtype=dtype)
        fl = flops(N, C, H, K, k, stride, pad, groups)
        ours = lambda x, w, b: conv2d(x, w, b, stride, pad, 1, groups)  # noqa: E731
        theirs = lambda x, w, b: F.conv2d(x, w, b, stride, pad, 1, groups)  # noqa: E731
        cases = [("fwd", ours, theirs, 1.0)]
        if name.startswith("seed"):
            cases.append(("fwd conv+relu+pool",
                          lambda x, w, b: conv2d_relu_maxpool2d(x, w, b, stride, pad, 1, groups),
                          lambda x, w, b: F.max_pool2d(F.relu(F.conv2d(x, w, b, stride, pad, 1, groups)), 2), 1.0))
        with torch.no_grad():
            for mode, fo, ft, mult in cases:
                t_o = timeit(lambda: fo(x, w, b), reps, device)
                t_t = timeit(lambda: ft(x, w, b), reps, device)
                rows.append((name, N, mode, fl * mult / t_o / 1e9, fl * mult / t_t / 1e9, t_t / t_o))
                print(f"{name:<20} {mode:<20} ours {rows[-1][3]:8.1f}  torch {rows[-1][4]:8.1f} GFLOP/s  "
                      f"ratio {rows[-1][5]:5.2f}", flush=True)
        if not args.no_backward:
            xs, ws, bs = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
            t_o = timeit(fwd_bwd(ours, xs, ws, bs), max(2, reps // 2), device)
            t_t = timeit(fwd_bwd(theirs, xs, ws, bs), max(2, reps // 2), device)
            rows.append((name, N, "fwd+bwd", 3 * fl / t_o / 1e9, 3 * fl / t_t / 1e9, t_t / t_o))
            print(f"{name:<20} {'fwd+bwd':<20} ours {rows[-1][3]:8.1f}  torch {rows[-1][4]:8.1f} GFLOP/s  "
                  f"ratio {rows[-1][5]:5.2f}", flush=True)
    write(rows, device, dtype)


def write(rows, device, dtype):
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    lines = [f"conv2d, {where}, {str(dtype).replace('torch.', '')}; GFLOP/s (fwd+bwd counts 3x the forward FLOPs)", "",
             "| layer | N | pass | fastattn GFLOP/s | torch GFLOP/s | speed-up |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {n} | {N} | {m} | {a:.1f} | {b:.1f} | {r:.2f}x |" for n, N, m, a, b, r in rows]
    text = "\n".join(lines)
    print()
    print(text)
    os.makedirs(OUT_DIR, exist_ok=True)
    tag = f"conv2d_{device.type}"
    with open(os.path.join(OUT_DIR, tag + ".md"), "w") as f:
        f.write(text + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels = [f"{n}\n{m}" for n, _, m, *_ in rows]
    pos = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.9), 4.5))
    ax.bar([p - 0.2 for p in pos], [r[3] for r in rows], 0.4, label="fastattn")
    ax.bar([p + 0.2 for p in pos], [r[4] for r in rows], 0.4, label="torch")
    ax.set_xticks(list(pos))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("GFLOP/s")
    ax.set_title(f"conv2d: {where}, {str(dtype).replace('torch.', '')}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(OUT_DIR, tag + ".png"), dpi=120)


if __name__ == "__main__":
    main()
