"""Optimizer step: fastattn.optim vs torch.optim's for-loop, foreach and fused implementations.

Same run, same parameters (N float32 elements split over T tensors of near-equal size), same
gradients; time per ``step()`` and the memory traffic it implies (each element of the parameter,
gradient and state read once and the parameter and state written once):

    SGD with momentum: 5 x 4 bytes per element; Adam / AdamW: 7 x 4 bytes per element.

    python benchmarks/bench_optim.py                # CPU: 1M and 10M params
    python benchmarks/bench_optim.py --device cuda  # GPU: adds 100M params over 200 tensors

Rows: ours ("fastattn cpu" on the CPU; "fastattn cuda" and "fastattn triton" on a GPU) and torch's
three implementations; "ours speedup" is relative to the first row of the case (the native kernel).
"""
from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402

import fastattn.optim as fo  # noqa: E402

# What our one pass moves per float32 element (read p, g, state; write p, state). torch's for-loop
# moves more: SGD momentum 8 x 4 (buf.mul_, buf.add_, p.add_ each a pass), +3 x 4 for weight decay
# (grad.add(p)), +3 x 4 for nesterov (grad.add(buf)): "sgd-nesterov-wd" is 14 x 4 vs our 5 x 4.
BYTES_PER_ELEMENT = {"sgd": 5 * 4, "sgd-nesterov-wd": 5 * 4, "adam": 7 * 4, "adamw": 7 * 4}
OPTIONS = {"sgd": dict(lr=1e-3, momentum=0.9), "sgd-nesterov-wd": dict(lr=1e-3, momentum=0.9, nesterov=True,
                                                                      weight_decay=1e-4),
           "adam": dict(lr=1e-3), "adamw": dict(lr=1e-3)}


def make(numel: int, tensors: int, device):
    """numel float32 params over `tensors` tensors of near-equal size, with gradients (made on the device)."""
    device = torch.device(device)
    sizes = [numel // tensors + (1 if i < numel % tensors else 0) for i in range(tensors)]
    g = torch.Generator(device=device).manual_seed(0)
    params = [torch.randn(s, generator=g, device=device).requires_grad_() for s in sizes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, device=device) * 1e-3
    return params


def optimizer(kind: str, impl: str, params):
    torch_cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind.split("-")[0]]
    our_cls = {"sgd": fo.SGD, "adam": fo.Adam, "adamw": fo.AdamW}[kind.split("-")[0]]
    kw = OPTIONS[kind]
    if impl.startswith("fastattn"):  # "fastattn <backend>"
        return our_cls(params, backend=impl.split()[-1], **kw)
    variant = impl.split()[-1]
    flags = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}[variant]
    return torch_cls(params, **kw, **flags)


def interleaved_best(fns, device, min_time: float, rounds: int = 7):
    """Best (minimum) seconds per call of each fn, the fns timed in turn in every round.

    Interleaving and taking the best round keeps the comparison fair on a shared, busy machine
    (a slow round hits every implementation alike; the minimum drops the rounds that were disturbed).
    On a GPU each fn is timed by common.bench (triton's do_bench: CUDA events, L2 flushed).
    """
    if torch.device(device).type == "cuda":
        return {name: common.bench(fn, device, min_time) for name, fn in fns.items()}
    reps = {}
    for name, fn in fns.items():
        fn()
        t0 = time.perf_counter()
        fn()
        reps[name] = max(1, int(min_time / rounds / max(time.perf_counter() - t0, 1e-6)))
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / reps[name])
    return best


def main():
    p = common.parser("optim")
    p.add_argument("--optims", default="sgd,adam,adamw", help="also: sgd-nesterov-wd")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--cases", default=None, help="e.g. 10000000/10,1000000/100 (numel/tensors)")
    p.add_argument("--backends", default=None, help="our backends to time (default: cpu; on a GPU cuda,triton)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.quick:
        cases = [(1_000_000, 10)]
    elif device.type == "cuda":
        cases = [(1_000_000, 10), (10_000_000, 10), (10_000_000, 200), (100_000_000, 200)]
    else:
        cases = [(1_000_000, 10), (1_000_000, 100), (10_000_000, 10), (10_000_000, 200)]
    if args.cases:
        cases = [tuple(int(x) for x in c.split("/")) for c in args.cases.split(",")]
    backends = args.backends or ("cuda,triton" if device.type == "cuda" else "cpu")
    ours = [f"fastattn {b}" for b in backends.split(",")]
    impls = ours + ["torch for-loop", "torch foreach", "torch fused"]

    table = common.Table("optim", ["case", "impl", "ms/step", "GB/s", "ours speedup"])
    for kind in args.optims.split(","):
        for numel, tensors in cases:
            case = f"{kind} {numel / 1e6:g}M/{tensors}"
            steps = {impl: optimizer(kind, impl, make(numel, tensors, device)).step for impl in impls}
            times = interleaved_best(steps, device, args.min_time)
            for impl in impls:
                t = times[impl]
                table.add(case=case, impl=impl, **{
                    "ms/step": t * 1e3, "GB/s": BYTES_PER_ELEMENT[kind] * numel / t / 1e9,
                    "ours speedup": t / times[ours[0]]})
            del steps, times
            if device.type == "cuda":
                torch.cuda.empty_cache()
    note = (f"N float32 parameters over T tensors (case N/T); 'ours speedup' = that row's time / {ours[0]}'s "
            "time (> 1: ours is faster). SGD uses momentum 0.9. CPU: best of 7 interleaved rounds; GPU: "
            "triton.testing.do_bench (CUDA events, L2 flushed).")
    table.finish(args, plot=dict(x="case", y="GB/s", group="impl"), note=note)


if __name__ == "__main__":
    main()
