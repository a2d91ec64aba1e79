"""LSTM: fastattn.nn.LSTM / LSTMCell vs torch.nn.LSTM / LSTMCell (its CPU kernels; cuDNN on GPU), same run.

    python benchmarks/bench_lstm.py            # the default cases
    python benchmarks/bench_lstm.py --quick    # cell, seed shape, LSTM(256, 256)
    python benchmarks/bench_lstm.py --full     # hidden 256/512/1024 x batch 1/32/128 x layers 1/2 x bidirectional

    python benchmarks/bench_lstm.py --threads 1 --cpu-time   # one thread, process CPU time (shared machine)

The CPU rows "fastattn cpu unfused" run our layer with FASTATTN_LSTM_FUSED=0 (per step a GEMM, then a
pointwise pass) against the default fused step (both products and the gate math in one kernel).
Bidirectional cases add "fastattn cpu bidir sequential / concurrent" rows (FASTATTN_LSTM_BIDIR): the two
directions one after the other (each on every thread) or side by side (one thread each).

Cases: one LSTMCell step (batch 8, hidden 50; with grad enabled as a training loop has it, and under
no_grad); the seed RNN (LSTM(8 -> 50), batch 64, 8 steps, then
Linear(50, 10) + cross entropy; forward+backward); sequence 100 with hidden 256/512/1024, batch
1/32/128, 1-2 layers, bidirectional; forward (no grad: our layer keeps no workspace), forward with grad
recording (no backward) and forward+backward.
FLOPs: forward 2*T*B*4H*(I_l + P) per layer and direction (+ 2*T*B*H*P with a projection);
forward+backward counted as 3x forward.
"""
from __future__ import annotations

import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
from fastattn.nn.rnn import LSTM, LSTMCell  # noqa: E402


def lstm_flops(T, B, I, H, layers, bidirectional):
    D = 2 if bidirectional else 1
    total = 0
    for layer in range(layers):
        inp = I if layer == 0 else H * D
        total += D * 2 * T * B * 4 * H * (inp + H)
    return total


def pair(device, *args, **kw):
    torch.manual_seed(0)
    ref = torch.nn.LSTM(*args, **kw).to(device)
    ours = LSTM(*args, **kw).to(device)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def with_env(name, value, fn):
    def f():
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn()
        finally:
            if old is None:
                del os.environ[name]
            else:
                os.environ[name] = old
    return f


def run_pair(table, args, case, flops, fn_torch, fn_ours, min_time, unfused=False, bidir=False):
    """torch vs ours; unfused: also ours with FASTATTN_LSTM_FUSED=0 (the CPU layer's GEMM + pointwise-pass
    step instead of the fused step), in the same run; bidir: also ours with FASTATTN_LSTM_BIDIR=sequential
    (the two directions one after the other, each using every thread) and =concurrent (one thread each)."""
    timer = lambda fn: common.bench(fn, args.device, min_time, cpu_time=args.cpu_time)  # noqa: E731
    t_torch = timer(fn_torch)
    t_ours = timer(fn_ours)
    table.add(case=case, impl="torch", ms=t_torch * 1e3, **{"GFLOP/s": flops / t_torch / 1e9, "vs torch": 1.0})
    table.add(case=case, impl=f"fastattn {args.device}", ms=t_ours * 1e3,
              **{"GFLOP/s": flops / t_ours / 1e9, "vs torch": t_torch / t_ours})
    if unfused and args.device == "cpu":
        t_unf = timer(with_env("FASTATTN_LSTM_FUSED", "0", fn_ours))
        table.add(case=case, impl="fastattn cpu unfused", ms=t_unf * 1e3,
                  **{"GFLOP/s": flops / t_unf / 1e9, "vs torch": t_torch / t_unf})
    if bidir and args.device == "cpu":
        for mode in ("sequential", "concurrent"):
            t_m = timer(with_env("FASTATTN_LSTM_BIDIR", mode, fn_ours))
            table.add(case=case, impl=f"fastattn cpu bidir {mode}", ms=t_m * 1e3,
                      **{"GFLOP/s": flops / t_m / 1e9, "vs torch": t_torch / t_m})


def bench_cell(table, args):
    dev = args.device
    torch.manual_seed(0)
    ref = torch.nn.LSTMCell(50, 50).to(dev)
    ours = LSTMCell(50, 50).to(dev)
    ours.load_state_dict(ref.state_dict())
    x, h, c = (torch.randn(8, 50, device=dev) for _ in range(3))
    flops = 2 * 8 * 200 * 100
    run_pair(table, args, "LSTMCell b8 h50 fwd", flops, lambda: ref(x, (h, c)), lambda: ours(x, (h, c)),
             args.min_time)

    def no_grad(fn):
        def f():
            with torch.no_grad():
                return fn()
        return f

    run_pair(table, args, "LSTMCell b8 h50 fwd no_grad", flops, no_grad(lambda: ref(x, (h, c))),
             no_grad(lambda: ours(x, (h, c))), args.min_time)


def bench_seed(table, args):
    dev = args.device
    ref, ours = pair(dev, 8, 50, batch_first=True)
    head = torch.nn.Linear(50, 10).to(dev)
    x = torch.randn(64, 8, 8, device=dev)
    y = torch.randint(0, 10, (64,), device=dev)

    def step(m):
        def f():
            out, _ = m(x)
            loss = torch.nn.functional.cross_entropy(head(out[:, -1]), y)
            loss.backward()
        return f

    flops = 3 * lstm_flops(8, 64, 8, 50, 1, False)
    run_pair(table, args, "seed b64 T8 8->50 fwd+bwd", flops, step(ref), step(ours), args.min_time, unfused=True)


def bench_seq(table, args, H, B, layers, bidirectional, T=100):
    dev = args.device
    ref, ours = pair(dev, H, H, layers, bidirectional=bidirectional)
    x = torch.randn(T, B, H, device=dev)
    flops = lstm_flops(T, B, H, H, layers, bidirectional)
    name = f"h{H} b{B} T{T} L{layers}{' bi' if bidirectional else ''}"
    min_time = args.min_time if flops < 2e10 else args.min_time / 3

    def fwd(m):
        def f():
            with torch.no_grad():
                m(x)
        return f

    run_pair(table, args, name + " fwd", flops, fwd(ref), fwd(ours), min_time, unfused=True, bidir=bidirectional)
    xg = x.clone().requires_grad_()
    # forward with autograd recording (ours keeps the backward's workspace; the no_grad rows above do not)
    run_pair(table, args, name + " fwd grad-on", flops, lambda: ref(xg), lambda: ours(xg), min_time,
             bidir=bidirectional)

    def fwd_bwd(m):
        def f():
            out, (h, c) = m(xg)
            out.sum().backward()
        return f

    run_pair(table, args, name + " fwd+bwd", 3 * flops, fwd_bwd(ref), fwd_bwd(ours), min_time, unfused=True,
             bidir=bidirectional)


def main():
    p = common.parser("lstm")
    p.add_argument("--full", action="store_true", help="the whole hidden x batch x layers x direction grid")
    p.add_argument("--threads", type=int, default=0,
                   help="torch.set_num_threads for both sides (0: torch's default); on a shared, oversubscribed "
                        "machine 1 thread gives stable figures")
    p.add_argument("--cpu-time", action="store_true",
                   help="CPU: time by process CPU time instead of wall clock (use with --threads 1 on a shared machine)")
    p.add_argument("--cases", default="",
                   help="only these sequence cases, e.g. '256x32,256x1,256x32bi' (hidden x batch; 1 layer; "
                        "'bi': bidirectional)")
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    table = common.Table("lstm", ["case", "impl", "ms", "GFLOP/s", "vs torch"])
    bench_cell(table, args)
    bench_seed(table, args)
    if args.quick:
        seq = [(256, 32, 1, False)]
    elif args.full:
        seq = list(itertools.product([256, 512, 1024], [1, 32, 128], [1, 2], [False, True]))
    else:
        seq = [(256, 32, 1, False), (256, 1, 1, False), (256, 128, 1, False), (512, 32, 1, False),
               (1024, 32, 1, False), (256, 32, 2, False), (256, 32, 1, True)]
    if args.cases:
        seq = [(int(c.split("x")[0]), int(c.split("x")[1].removesuffix("bi")), 1, c.endswith("bi"))
               for c in args.cases.split(",")]
    for H, B, layers, bi in seq:
        bench_seq(table, args, H, B, layers, bi)
    table.finish(args, plot=dict(x="case", y="vs torch", group="impl", title="LSTM: speed vs torch (>1 = faster)"),
                 note="ms: median per call; vs torch: torch time / ours. Forward cases run under no_grad.")


if __name__ == "__main__":
    main()
