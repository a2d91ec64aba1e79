"""CPU fp32 GEMM: fastattn's csrc/cpu/gemm.h (through the test hook fastattn._C.gemm) vs torch.mm, same run.

    MALLOC_MMAP_THRESHOLD_=2000000000 MALLOC_TRIM_THRESHOLD_=4000000000 \\
        python benchmarks/bench_gemm.py --threads 2        # --quick: three cases
        python benchmarks/bench_gemm.py --threads 1 --cpu-time   # stable on a shared machine

Cases: a Transformer's Linear at M = 4096 rows with (K, N) in (128, 384), (128, 128), (128, 512),
(512, 128), in the three products a Linear runs: forward NT (x @ w^T), grad input NN (g @ w), grad
weight TN (g^T @ x); LSTM-like small M (64, 128, 512) with K = N = 256 / 512 (forward NT); 1024^3 NN.
Both write into a preallocated C (torch.mm(out=)). Each timing is the minimum (and median) over
--rounds rounds: on a shared machine the minimum is the figure least disturbed by other jobs.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
from fastattn import _C  # noqa: E402


def timing(fn, rounds, min_time, clock=time.perf_counter):
    """(min, median) seconds per call over `rounds` rounds of ~min_time / rounds each."""
    fn()
    fn()
    t0 = clock()
    fn()
    once = max(clock() - t0, 1e-7)
    reps = max(1, int(min_time / rounds / once))
    res = []
    for _ in range(rounds):
        t0 = clock()
        for _ in range(reps):
            fn()
        res.append((clock() - t0) / reps)
    return min(res), statistics.median(res)


def cases(quick):
    out = []
    for K, N in [(128, 384), (128, 128), (128, 512), (512, 128)]:
        M = 4096
        out.append((f"fwd NT x({M}x{K}) w({N}x{K})", M, N, K, False, True))
        out.append((f"gin NN g({M}x{N}) w({N}x{K})", M, K, N, False, False))
        out.append((f"gw TN g({M}x{N})^T x({M}x{K})", N, K, M, True, False))
    for M in (64, 128, 512):
        for KN in (256, 512):
            out.append((f"small NT M={M} K=N={KN}", M, KN, KN, False, True))
    out.append(("NN 1024^3", 1024, 1024, 1024, False, False))
    return [out[0], out[12], out[-1]] if quick else out


def main():
    p = common.parser("gemm")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--cpu-time", action="store_true",
                   help="time by process CPU time (with --threads 1: stable on a shared machine)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device != "cpu":
        print("bench_gemm: CPU only (csrc/cpu/gemm.h); the CUDA and Triton GEMMs are timed by bench_linear.py")
        return
    name = f"gemm_{torch.get_num_threads()}t"
    table = common.Table(name, ["case", "M", "N", "K", "impl", "GF/s", "GF/s (median)", "vs torch"])
    for label, M, N, K, ta, tb in cases(args.quick):
        torch.manual_seed(0)
        a = torch.randn(K, M) if ta else torch.randn(M, K)
        b = torch.randn(N, K) if tb else torch.randn(K, N)
        c = torch.empty(M, N)
        A, B = (a.t() if ta else a), (b.t() if tb else b)
        gf = 2 * M * N * K / 1e9
        clock = time.process_time if args.cpu_time else time.perf_counter
        ours = timing(lambda: _C.gemm(a, b, c, ta, tb, 1.0, 0.0, None, 0, False), args.rounds, args.min_time, clock)
        ref = timing(lambda: torch.mm(A, B, out=c), args.rounds, args.min_time, clock)
        for impl, t in (("fastattn gemm", ours), ("torch.mm", ref)):
            table.add(case=label, M=M, N=N, K=K, impl=impl, **{"GF/s": gf / t[0], "GF/s (median)": gf / t[1],
                                                              "vs torch": ref[0] / t[0]})
    clock = "process CPU time" if args.cpu_time else "wall clock"
    table.finish(args, plot=dict(x="case", y="GF/s", group="impl"),
                 note=f"kernel: {_C.gemm_kernel()}; {clock}; GF/s from the minimum time, 'median' from the median; "
                      "vs torch = torch.mm time / this row's (minima)")

if __name__ == "__main__":
    main()
