"""fastattn.linear vs torch (F.linear, and F.linear + the activation as separate ops): same run, same shapes.

    python benchmarks/bench_linear.py [--device cpu|cuda] [--dtype float32] [--quick] [--threads N]
                                      [--no-backward] [--only SUBSTRING] [--cpu-time]

Layers: the LM / seq2seq Transformer's projections and FFN at 4096 tokens (d_model 128: q/k/v
128->384, out 128->128, FFN up 128->512 + gelu, FFN down 512->128), the seed CNN's dense layers
(batch 32: 30752->64 + relu, 64->10) and one big GEMM (4096 x 1024 -> 1024). Forward (no grad) and
forward+backward (grads of input, weight and bias). GFLOP/s count 2*M*N*K per forward and 3x that
for forward+backward. fp32 on CPU, fp16 on GPU by default. Writes benchmarks/out/linear_<device>.md/.csv/.png.

``--cpu-time`` times with the process's CPU clock instead of the wall clock (use with ``--threads 1``),
alternating ours and torch and keeping each one's fastest round (bench_conv2d's timer): on a machine
shared with other jobs the wall clock mostly measures waiting.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
from benchmarks.bench_conv2d import bench_cpu_time_pair, fwd_bwd  # noqa: E402
from fastattn import _ext  # noqa: E402
from fastattn.ops.linear import linear  # noqa: E402

# name, M (rows: tokens or batch), K (in_features), N (out_features), activation
LAYERS = [
    ("LM qkv 128->384", 4096, 128, 384, None),
    ("LM out 128->128", 4096, 128, 128, None),
    ("LM ffn up 128->512 gelu", 4096, 128, 512, "gelu"),
    ("LM ffn down 512->128", 4096, 512, 128, None),
    ("CNN fc1 30752->64 relu", 32, 30752, 64, "relu"),
    ("CNN fc2 64->10", 32, 64, 10, None),
    ("big 1024->1024", 4096, 1024, 1024, None),
]
TORCH_ACT = {None: lambda z: z, "relu": F.relu, "gelu": F.gelu, "silu": F.silu}


def main():
    p = common.parser("linear")
    p.add_argument("--dtype", default=None, help="float32 (CPU default), float16 (GPU default), bfloat16")
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--only", default=None, help="run the layers whose name contains this")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cpu-time", action="store_true", help="time with the process CPU clock (see above)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)

    def timer(fo, ft):
        if args.cpu_time and device.type == "cpu":
            return bench_cpu_time_pair(fo, ft, args.min_time)
        return common.bench(fo, device, args.min_time), common.bench(ft, device, args.min_time)

    table = common.Table(f"linear_{device.type}", ["case", "layer", "M", "K", "N", "pass", "impl", "ms", "GFLOP/s",
                                                   "vs torch"])
    for name, M, K, N, act in LAYERS:
        if args.only and args.only not in name:
            continue
        if args.quick:
            M = max(1, M // 8)
        torch.manual_seed(0)
        x = torch.randn(M, K, device=device, dtype=dtype)
        w = torch.randn(N, K, device=device, dtype=dtype) * K ** -0.5
        b = torch.randn(N, device=device, dtype=dtype)
        fl = 2.0 * M * N * K
        ours = lambda x, w, b: linear(x, w, b, activation=act)  # noqa: E731
        theirs = lambda x, w, b: TORCH_ACT[act](F.linear(x, w, b))  # noqa: E731
        timings = []
        with torch.no_grad():
            timings.append(("fwd", fl) + timer(lambda: ours(x, w, b), lambda: theirs(x, w, b)))
        if not args.no_backward:
            xs, ws, bs = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
            timings.append(("fwd+bwd", 3 * fl) + timer(fwd_bwd(ours, xs, ws, bs), fwd_bwd(theirs, xs, ws, bs)))
        if device.type == "cuda":  # our Triton kernels too (auto runs the hand-written CUDA ones)
            tri = lambda x, w, b: linear(x, w, b, activation=act, backend="triton")  # noqa: E731
            with torch.no_grad():
                timings[0] += (common.bench(lambda: tri(x, w, b), device, args.min_time),)
            if not args.no_backward:
                timings[1] += (common.bench(fwd_bwd(tri, xs, ws, bs), device, args.min_time),)
        for mode, f, t_o, t_t, *t_tri in timings:
            impls = [(f"fastattn {device.type}", t_o), ("torch", t_t)] + [("fastattn triton", t) for t in t_tri]
            for impl, t in impls:
                table.add(case=f"{name} {mode}", layer=name, M=M, K=K, N=N, **{"pass": mode}, impl=impl, ms=t * 1e3,
                          **{"GFLOP/s": f / t / 1e9, "vs torch": t_t / t})
    kernel = ""
    if device.type == "cpu" and _ext._C is not None and hasattr(_ext._C, "gemm_kernel"):
        kernel = f" CPU GEMM: {_ext._C.gemm_kernel()}."
    clock = ("process CPU time, fastest of 7 alternating rounds" if args.cpu_time and device.type == "cpu"
             else "wall clock, median")
    note = (f"{str(dtype).replace('torch.', '')}, timed by {clock}; 'torch' is F.linear, followed by the "
            f"activation as a separate op where the layer has one; 'vs torch' = torch time / ours (> 1: we are "
            f"faster).{kernel}")
    table.finish(args, plot=dict(x="case", y="GFLOP/s", group="impl"), note=note)


if __name__ == "__main__":
    main()
