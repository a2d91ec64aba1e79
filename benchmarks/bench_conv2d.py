"""fastattn.conv2d vs torch (oneDNN on CPU, cuDNN on GPU): same run, same shapes.

    python benchmarks/bench_conv2d.py [--device cpu|cuda] [--dtype float32] [--quick] [--cpu-time]
                                      [--threads N] [--no-backward] [--only SUBSTRING]

Layers: the seed CNN's first conv (N=64, 3->32, 3x3, 64x64) and its fused conv+ReLU+maxpool block
(vs torch's three ops), ResNet 3x3 layers (one stride 2), depthwise 3x3 (stride 1 and 2) and 7x7, a 1x1; forward and
forward+backward (all three gradients). GFLOP/s count 2*N*K*P*Q*C/groups*R*S per forward and 3x
that for forward+backward. Writes benchmarks/out/conv2d_<device>.md/.csv/.png.

``--cpu-time`` times with the process's CPU clock instead of the wall clock (use with
``--threads 1``), alternating ours and torch and keeping each one's fastest round: on a machine
shared with other jobs the wall clock mostly measures waiting.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
from fastattn.ops.conv2d import conv2d, conv2d_relu_maxpool2d  # noqa: E402

# name, N, C, H(=W), K, kernel, stride, padding, groups
LAYERS = [
    ("seed 3->32 3x3 @64", 64, 3, 64, 32, 3, 1, 1, 1),
    ("3x3 64->64 @56", 32, 64, 56, 64, 3, 1, 1, 1),
    ("3x3 128->128 @28", 32, 128, 28, 128, 3, 1, 1, 1),
    ("3x3 256->256 @14", 32, 256, 14, 256, 3, 1, 1, 1),
    ("3x3 s2 64->128 @56", 32, 64, 56, 128, 3, 2, 1, 1),
    ("dw 3x3 128 @56", 32, 128, 56, 128, 3, 1, 1, 128),
    ("dw 3x3 s2 128 @56", 32, 128, 56, 128, 3, 2, 1, 128),
    ("dw 7x7 96 @56", 32, 96, 56, 96, 7, 1, 3, 96),
    ("1x1 64->256 @56", 32, 64, 56, 256, 1, 1, 0, 1),
]


def flops(N, C, H, K, k, stride, pad, groups):
    P = (H + 2 * pad - k) // stride + 1
    return 2.0 * N * K * P * P * (C // groups) * k * k


def bench_cpu_time_pair(f_ours, f_torch, min_time=0.3, warmup=2, rounds=7):
    """CPU seconds (all threads of the process) per call of each, rounds alternating between the
    two, the fastest round of each: other jobs on the machine only ever slow a round down."""
    for _ in range(warmup):
        f_ours()
        f_torch()
    reps = []
    for f in (f_ours, f_torch):
        t0 = time.process_time()
        f()
        reps.append(max(1, int(min_time / rounds / max(time.process_time() - t0, 1e-6))))
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        for i, f in enumerate((f_ours, f_torch)):
            t0 = time.process_time()
            for _ in range(reps[i]):
                f()
            best[i] = min(best[i], (time.process_time() - t0) / reps[i])
    return best[0], best[1]


def fwd_bwd(f, x, w, b):
    def run():
        for t in (x, w, b):
            t.grad = None
        f(x, w, b).sum().backward()
    return run


def main():
    p = common.parser("conv2d")
    p.add_argument("--dtype", default=None, help="float32 (CPU default), float16 (GPU default), bfloat16")
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--only", default=None, help="run the layers whose name contains this")
    p.add_argument("--cpu-time", action="store_true", help="time with the process CPU clock (see above)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    channels_last = device.type == "cuda"

    def timer(fo, ft):
        if args.cpu_time and device.type == "cpu":
            return bench_cpu_time_pair(fo, ft, args.min_time)
        return common.bench(fo, device, args.min_time), common.bench(ft, device, args.min_time)

    table = common.Table(f"conv2d_{device.type}", ["case", "layer", "N", "pass", "impl", "ms", "GFLOP/s", "vs torch"])
    for name, N, C, H, K, k, stride, pad, groups in LAYERS:
        if args.only and args.only not in name:
            continue
        if args.quick:
            N = max(1, N // 8)
        torch.manual_seed(0)
        x = torch.randn(N, C, H, H, device=device, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        w = torch.randn(K, C // groups, k, k, device=device, dtype=dtype) * (C // groups * k * k) ** -0.5
        b = torch.randn(K, device=device, dtype=dtype)
        fl = flops(N, C, H, K, k, stride, pad, groups)
        ours = lambda x, w, b: conv2d(x, w, b, stride, pad, 1, groups)  # noqa: E731
        theirs = lambda x, w, b: F.conv2d(x, w, b, stride, pad, 1, groups)  # noqa: E731
        cases = [("fwd", ours, theirs)]
        if name.startswith("seed"):
            cases.append(("fwd conv+relu+pool", lambda x, w, b: conv2d_relu_maxpool2d(x, w, b, stride, pad, 1, groups),
                          lambda x, w, b: F.max_pool2d(F.relu(F.conv2d(x, w, b, stride, pad, 1, groups)), 2)))
        timings = []
        with torch.no_grad():
            for mode, fo, ft in cases:
                timings.append((mode, fl) + timer(lambda: fo(x, w, b), lambda: ft(x, w, b)))
        if not args.no_backward:
            xs, ws, bs = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
            timings.append(("fwd+bwd", 3 * fl) + timer(fwd_bwd(ours, xs, ws, bs), fwd_bwd(theirs, xs, ws, bs)))
        for mode, f, t_o, t_t in timings:
            for impl, t in ((f"fastattn {device.type}", t_o), ("torch", t_t)):
                table.add(case=f"{name} {mode}", layer=name, N=N, **{"pass": mode}, impl=impl, ms=t * 1e3,
                          **{"GFLOP/s": f / t / 1e9, "vs torch": t_t / t})
    clock = ("process CPU time, fastest of 7 alternating rounds" if args.cpu_time and device.type == "cpu"
             else "wall clock, median")
    note = (f"{str(dtype).replace('torch.', '')}, {'channels_last' if channels_last else 'NCHW'}, timed by {clock}; "
            "'vs torch' = torch time / ours (> 1: we are faster).")
    table.finish(args, plot=dict(x="case", y="GFLOP/s", group="impl"), note=note)


if __name__ == "__main__":
    main()
