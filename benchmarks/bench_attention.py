"""fastattn attention vs torch.nn.functional.scaled_dot_product_attention: same run, same shapes.

    python benchmarks/bench_attention.py [--device cpu|cuda] [--quick] [--max-seq N] [--cpu-time]
                                         [--threads N] [--only SUBSTRING]

Ours: every fastattn backend that runs on the device (cpu; cuda and triton on a GPU). Torch: its
default SDPA on CPU; on a GPU each SDPA backend it has (flash, efficient, cudnn, math) through
``torch.nn.attention.sdpa_kernel``. Modes: forward, backward (the gradients of q, k, v given the
saved forward), forward+backward; causal and not; sequence lengths 128..8192 (2048 on CPU unless
``--max-seq``) at a fixed number of tokens (B = tokens / L), head size 64 and 128; fp32 on CPU,
fp16 and bf16 on GPU; plus decoding (L = 1, S = 4096, B = 8, H = 32); plus packed variable-length
batches ("varlen": uneven lengths 1..L, one fused ``attention_varlen`` call vs a Python loop of torch's
SDPA over the sequences, and vs a loop of our dense op); plus the seq2seq model's small problems
("small": B = 128, H = 4, L = S = 12..13, E = 16: plain, causal, and a (B, 1, 1, S) key-padding bool
mask), where the per-call cost matters more than the arithmetic.

GFLOP/s count 4·B·H·L·S·E for the forward (half when causal), 2.5x that for the backward, 3.5x for
forward+backward. "vs torch" = the fastest torch backend's time / ours (> 1: ours is faster).
Writes benchmarks/out/attention_<device>[_cputime].md/.csv/.png.

``--cpu-time`` times with the process's CPU clock (use with ``--threads 1``): on a machine shared
with other jobs the wall clock mostly measures waiting.
"""
from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
import fastattn  # noqa: E402
from fastattn import backend as fa_backend  # noqa: E402


def our_backends(device: torch.device):
    names = []
    for name in ("cpu", "cuda", "triton"):
        if fa_backend.device_reasons(name, device, "attention_fwd"):
            continue
        if name == "triton":
            try:
                import fastattn.triton.attention  # noqa: F401
            except ImportError:
                continue
        names.append(name)
    return names


def torch_backends(device: torch.device):
    """(label, context factory) for each torch SDPA implementation to time."""
    import contextlib
    if device.type != "cuda":
        return [("torch sdpa", contextlib.nullcontext)]
    from torch.nn.attention import SDPBackend, sdpa_kernel
    out = []
    for label, b in (("torch flash", "FLASH_ATTENTION"), ("torch efficient", "EFFICIENT_ATTENTION"),
                     ("torch cudnn", "CUDNN_ATTENTION"), ("torch math", "MATH")):
        if hasattr(SDPBackend, b):
            out.append((label, lambda b=b: sdpa_kernel(getattr(SDPBackend, b))))
    return out


def cases(args, device):
    dtypes = [torch.float32] if device.type == "cpu" else [torch.float16, torch.bfloat16]
    max_seq = args.max_seq or (2048 if device.type == "cpu" else 8192)
    tokens = args.tokens or (4096 if device.type == "cpu" else 16384)
    seqs = [s for s in (128, 256, 512, 1024, 2048, 4096, 8192) if s <= max_seq]
    heads = (64, 128)
    if args.quick:
        seqs, heads, tokens = [128, 256], (64,), 512
    for dtype in dtypes:
        for E in heads:
            H = 8 if device.type == "cpu" else 2048 // E
            for L in seqs:
                for causal in (False, True):
                    yield dict(B=max(1, tokens // L), H=H, L=L, S=L, E=E, causal=causal, dtype=dtype, decode=False)
        S = 512 if args.quick else 4096
        yield dict(B=8, H=32, L=1, S=S, E=64 if device.type == "cpu" else 128, causal=False, dtype=dtype,
                   decode=True)


def varlen_lengths(tokens: int, max_len: int, seed: int = 0):
    """Uneven sequence lengths summing to ``tokens``: a few long ones and many short ones."""
    g = torch.Generator().manual_seed(seed)
    lens = []
    while sum(lens) < tokens:
        frac = torch.rand((), generator=g).item() ** 3  # skewed towards short sequences
        lens.append(max(1, min(int(frac * max_len), tokens - sum(lens))))
    return lens


def run_varlen_cases(args, device, ours, timeit, table):
    """Packed batches: our one fused call vs per-sequence loops (torch SDPA, and our dense op)."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    tokens = args.tokens or (4096 if device.type == "cpu" else 16384)
    max_len = 256 if args.quick else (args.max_seq or 2048)
    if args.quick:
        tokens = 512
    E, H = 64, (8 if device.type == "cpu" else 16)
    lens = varlen_lengths(tokens, max_len)
    cu = torch.tensor([0] + [sum(lens[:i + 1]) for i in range(len(lens))], dtype=torch.int32, device=device)
    bounds = [(int(a), int(b)) for a, b in zip(cu.tolist(), cu.tolist()[1:])]
    for causal in (False, True):
        name = f"varlen N{len(lens)} T{tokens} max{max(lens)} H{H} E{E}{' causal' if causal else ''}"
        if args.only and args.only not in name:
            continue
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(tokens, H, E, generator=g).to(device, dtype) for _ in range(3))
        fwd_flops = sum(4.0 * H * n * n * E * (0.5 if causal else 1.0) for n in lens)

        def loop(attn):
            def fn(qq, kk, vv):
                outs = [attn(qq[a:b].transpose(0, 1), kk[a:b].transpose(0, 1), vv[a:b].transpose(0, 1))
                        for a, b in bounds]
                return torch.cat([o.transpose(0, 1) for o in outs])
            return fn

        impls = [(f"fastattn {b} varlen", lambda qq, kk, vv, b=b: fastattn.attention_varlen(
            qq, kk, vv, cu, cu, max(lens), max(lens), causal=causal, backend=b)) for b in ours if b != "triton"]
        impls += [(f"fastattn {b} per-seq loop", loop(lambda a, b_, c, b=b: fastattn.scaled_dot_product_attention(
            a, b_, c, is_causal=causal, backend=b))) for b in ours if b != "triton"]
        impls += [("torch sdpa per-seq loop", loop(lambda a, b_, c: F.scaled_dot_product_attention(
            a, b_, c, is_causal=causal)))]
        for mode, mult in (("fwd", 1.0), ("fwd+bwd", 3.5)):
            times = {}
            for label, fn in impls:
                qq, kk, vv = (t.detach().requires_grad_(mode != "fwd") for t in (q, k, v))
                try:
                    if mode == "fwd":
                        with torch.no_grad():
                            times[label] = timeit(lambda: fn(qq, kk, vv))
                    else:
                        go = torch.randn(tokens, H, E, device=device, dtype=dtype)
                        times[label] = timeit(lambda: torch.autograd.grad(fn(qq, kk, vv), (qq, kk, vv), go))
                except (RuntimeError, NotImplementedError) as e:
                    print(f"  {label} {mode} {name}: skipped ({str(e).splitlines()[0][:100]})")
            _add_rows(table, name, mode, times, "torch sdpa per-seq loop", fwd_flops * mult)


def _add_rows(table, name: str, mode: str, times: dict, torch_label: str, flops: float) -> None:
    """One table row per timed implementation; 'vs torch' against the row labelled ``torch_label``."""
    torch_t = times.get(torch_label)
    for label, t in times.items():
        row = dict(case=name, mode=mode, impl=label, ms=t * 1e3, **{"GFLOP/s": flops / t / 1e9})
        row["plot"] = f"{mode} {name}"
        if torch_t is not None:
            row["vs torch"] = torch_t / t
        table.add(**row)


def run_small_cases(args, device, ours, timeit, table):
    """The seq2seq model's attention calls: many tiny (batch, head) problems per call."""
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    B, H, E = 128, 4, 16
    g = torch.Generator(device="cpu").manual_seed(0)
    lens = torch.randint(7, 14, (B,), generator=g)
    for L, S, kind in ((13, 13, "plain"), (12, 12, "causal"), (13, 13, "key-padding mask"), (12, 13, "key-padding mask")):
        name = f"small B{B} H{H} L{L} S{S} E{E} {kind}"
        if args.only and args.only not in name:
            continue
        q, k, v = (torch.randn(B, H, n, E, generator=g).to(device, dtype) for n in (L, S, S))
        mask = (torch.arange(S)[None, :] < lens[:, None]).view(B, 1, 1, S).to(device) if "mask" in kind else None
        causal = kind == "causal"
        fwd_flops = 4.0 * B * H * L * S * E * (0.5 if causal else 1.0)
        impls = [(f"fastattn {b}", lambda qq, kk, vv, b=b: fastattn.scaled_dot_product_attention(
            qq, kk, vv, attn_mask=mask, is_causal=causal, backend=b)) for b in ours]
        impls += [("torch sdpa", lambda qq, kk, vv: F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask,
                                                                                    is_causal=causal))]
        for mode, mult in (("fwd", 1.0), ("fwd+bwd", 3.5)):
            times = {}
            for label, fn in impls:
                qq, kk, vv = (t.detach().requires_grad_(mode != "fwd") for t in (q, k, v))
                try:
                    if mode == "fwd":
                        with torch.no_grad():
                            times[label] = timeit(lambda: fn(qq, kk, vv))
                    else:
                        go = torch.randn(B, H, L, E, device=device, dtype=dtype)
                        times[label] = timeit(lambda: torch.autograd.grad(fn(qq, kk, vv), (qq, kk, vv), go))
                except (RuntimeError, NotImplementedError) as e:
                    print(f"  {label} {mode} {name}: skipped ({str(e).splitlines()[0][:100]})")
            _add_rows(table, name, mode, times, "torch sdpa", fwd_flops * mult)


def main():
    p = common.parser("attention")
    p.add_argument("--max-seq", type=int, default=0, help="longest sequence (default 2048 on CPU, 8192 on GPU)")
    p.add_argument("--tokens", type=int, default=0, help="B*L per case (default 4096 on CPU, 16384 on GPU)")
    p.add_argument("--cpu-time", action="store_true", help="time with the process CPU clock (CPU only)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (CPU)")
    p.add_argument("--only", default="", help="run only cases whose name contains this")
    p.add_argument("--no-varlen", action="store_true", help="skip the packed variable-length cases")
    p.add_argument("--no-small", action="store_true", help="skip the small-problem (seq2seq) cases")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    ours = our_backends(device)
    theirs = torch_backends(device)
    print(f"ours: {ours}; torch: {[t[0] for t in theirs]}; {common.machine(device)}")

    def timeit(fn):
        return common.bench(fn, device, args.min_time, cpu_time=args.cpu_time)

    suffix = "_cputime" if args.cpu_time and device.type == "cpu" else ""
    table = common.Table(f"attention_{device.type}{suffix}", ["case", "mode", "impl", "ms", "GFLOP/s", "vs torch"])
    for c in cases(args, device):
        B, H, L, S, E, causal, dtype = c["B"], c["H"], c["L"], c["S"], c["E"], c["causal"], c["dtype"]
        name = (f"decode B{B} H{H} S{S} E{E}" if c["decode"] else
                f"B{B} H{H} L{L} E{E}{' causal' if causal else ''}")
        if device.type == "cuda":
            name += " " + str(dtype).split(".")[-1]
        if args.only and args.only not in name:
            continue
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(B, H, n, E, generator=g).to(device, dtype) for n in (L, S, S))
        fwd_flops = 4.0 * B * H * L * S * E * (0.5 if causal else 1.0)
        modes = [("fwd", 1.0)] if c["decode"] else [("fwd", 1.0), ("bwd", 2.5), ("fwd+bwd", 3.5)]

        impls = [(f"fastattn {b}", lambda qq, kk, vv, b=b: fastattn.scaled_dot_product_attention(
            qq, kk, vv, is_causal=causal, backend=b), None) for b in ours]
        impls += [(label, lambda qq, kk, vv: F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal), ctx)
                  for label, ctx in theirs]

        for mode, mult in modes:
            times = {}
            for label, fn, ctx in impls:
                def run():
                    qq, kk, vv = (t.detach().requires_grad_(mode != "fwd") for t in (q, k, v))
                    if mode == "fwd":
                        with torch.no_grad():
                            return timeit(lambda: fn(qq, kk, vv))
                    if mode == "bwd":
                        out = fn(qq, kk, vv)
                        go = torch.randn_like(out)
                        return timeit(lambda: torch.autograd.grad(out, (qq, kk, vv), go, retain_graph=True))
                    go = torch.randn(B, H, L, E, device=device, dtype=dtype)
                    return timeit(lambda: torch.autograd.grad(fn(qq, kk, vv), (qq, kk, vv), go))
                try:
                    if ctx is None:
                        times[label] = run()
                    else:
                        with ctx():
                            times[label] = run()
                except (RuntimeError, NotImplementedError) as e:  # a backend refusing the input (or out of memory)
                    print(f"  {label} {mode} {name}: skipped ({str(e).splitlines()[0][:100]})")
            torch_best = min((t for lbl, t in times.items() if lbl.startswith("torch")), default=None)
            for label, t in times.items():
                row = dict(case=name, mode=mode, impl=label, ms=t * 1e3, **{"GFLOP/s": fwd_flops * mult / t / 1e9})
                row["plot"] = f"{mode} {name}"  # the plot's x axis (not a table column)
                if torch_best is not None:
                    row["vs torch"] = torch_best / t
                table.add(**row)

    if not args.no_varlen:
        run_varlen_cases(args, device, ours, timeit, table)
    if not args.no_small:
        run_small_cases(args, device, ours, timeit, table)

    note = ("GFLOP/s: 4·B·H·L·S·E forward (half when causal), 2.5x backward, 3.5x forward+backward. "
            "'vs torch': the fastest torch SDPA backend's time / this row's time."
            + (" Timed with the process CPU clock." if args.cpu_time and device.type == "cpu" else ""))
    table.finish(args, plot=dict(x="plot", y="GFLOP/s", group="impl"), note=note)


if __name__ == "__main__":
    main()
