"""Compile every Triton kernel for a GPU on a machine without one.

    python -m fastattn.triton.aot [--arch 90] [--full | --first-config] [--ops attention,conv2d,lstm,optim,linear]

Under ``TRITON_INTERPRET=1`` the kernels run as numpy, which accepts code that the real compiler rejects
(types, block shapes of ``tl.dot``, shared memory). This module runs our Triton ops on CPU tensors of GPU-sized
shapes, and where an op would launch a kernel it instead compiles that kernel, as that launch would, with
``triton.compile`` for ``cuda:<arch>`` down to a cubin (Triton's own ptxas): every autotune config of an
autotuned kernel, and the constexpr values the op passes. Nothing runs, so the ops' outputs are garbage.

What it proves: the kernels compile for the arch, and which autotune configs fit its shared memory. What it
does not: that they are correct or fast on a GPU (``make gpu-check`` on a GPU machine does that). A config that
needs more shared memory than the arch has is listed, not an error (the autotuner skips it at run time), unless
every config of a launch is over. Needs Triton >= 3.3 (``ASTSource`` with named signatures); must run without
``TRITON_INTERPRET`` (the interpreter's kernel objects cannot be compiled).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Dict, List

import torch

# The arch's shared memory per block (opt-in maximum), bytes.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}

_TORCH_TO_TRITON = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
                    torch.uint8: "u8", torch.bool: "i1"}


class _Compiler:
    """Stands in for ``kernel[grid]``: compiles the kernel for every config the launch could use."""

    def __init__(self, arch: int, log: List[dict], all_configs: bool):
        self.arch, self.log, self.all_configs, self._seen = arch, log, all_configs, set()

    def __call__(self, kernel):
        return _Launch(self, kernel)

    def compile(self, kernel, args, kwargs):
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.runtime.autotuner import Autotuner

        configs = kernel.configs if isinstance(kernel, Autotuner) else [None]
        configs = configs if self.all_configs else configs[:1]
        fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
        results = []
        for cfg in configs:
            kw = dict(kwargs)
            options = {k: kw.pop(k) for k in ("num_warps", "num_stages", "num_ctas") if k in kw}
            if cfg is not None:
                kw.update(cfg.kwargs)
                options.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            signature, constexprs = _signature(fn, args, kw)
            key = (fn.__name__, tuple(sorted(signature.items())), tuple(sorted((k, repr(v)) for k, v in
                                                                                constexprs.items())),
                   tuple(sorted(options.items())))
            if key in self._seen:
                continue
            self._seen.add(key)
            t0 = time.perf_counter()
            src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
            entry = dict(kernel=fn.__name__, config={k: v for k, v in constexprs.items() if k.isupper()
                                                     and isinstance(v, (int, bool))}, options=options)
            try:
                compiled = triton.compile(src, target=GPUTarget("cuda", self.arch, 32), options=options)
                entry.update(ok=True, shared=int(compiled.metadata.shared), seconds=time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - reported per kernel, the run fails at the end
                entry.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                             seconds=time.perf_counter() - t0)
            entry["fits"] = entry.get("ok", False) and entry["shared"] <= SHARED_LIMIT.get(self.arch, 99 * 1024)
            results.append(entry)
        if results:
            self.log.append(dict(launch=fn.__name__, results=results))


class _Launch:
    def __init__(self, compiler: _Compiler, kernel):
        self.compiler, self.kernel = compiler, kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.compiler.compile(self.kernel, args, kwargs)


def _signature(fn, args, kwargs):
    """Triton's signature and constexpr dicts for a call ``fn(*args, **kwargs)``, from the values' types."""
    import triton.language as tl

    bound = dict(zip(fn.arg_names, args))
    bound.update(kwargs)
    signature: Dict[str, str] = {}
    constexprs: Dict[str, object] = {}
    for p in fn.params:
        value = bound[p.name] if p.name in bound else p.default
        if p.is_constexpr or value is None or isinstance(value, tl.dtype):
            signature[p.name] = "constexpr"
            constexprs[p.name] = value
        elif isinstance(value, torch.Tensor):
            signature[p.name] = "*" + _TORCH_TO_TRITON[value.dtype]
        elif isinstance(value, bool):
            signature[p.name] = "i1"
        elif isinstance(value, int):
            signature[p.name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"aot: argument {p.name} of {fn.__name__} has an unexpected type {type(value)}")
    return signature, constexprs


@contextlib.contextmanager
def compiling_for(arch: int, log: List[dict], all_configs: bool = True):
    """Within: every Triton launch of our ops compiles for ``cuda:<arch>`` instead of running (every autotune
    config, or only the first of each list)."""
    from fastattn.triton import _compat
    previous = _compat._AOT
    _compat._AOT = (arch, _Compiler(arch, log, all_configs))
    try:
        yield
    finally:
        _compat._AOT = previous


# --------------------------------------------------------------------------------------------
# What the ops are called with: the dtypes, head sizes and features whose kernels differ.
# --------------------------------------------------------------------------------------------
def _attention_cases(full: bool):
    dtypes = [torch.float16, torch.bfloat16, torch.float32] if full else [torch.float16, torch.float32]
    heads = [64, 128, 256] if full else [64, 128]
    for dtype in dtypes:
        for E in heads:
            yield dict(dtype=dtype, E=E, bias=False, window=(-1, -1), dropout=0.0, softcap=0.0)
        yield dict(dtype=dtype, E=64, bias=True, window=(-1, 0), dropout=0.1, softcap=30.0)
        if full:
            yield dict(dtype=dtype, E=96, bias=True, window=(128, 0), dropout=0.0, softcap=0.0)


def _run_attention(full: bool) -> None:
    from fastattn.triton import attention as ta
    B, H, L = 2, 4, 256
    for c in _attention_cases(full):
        q = torch.empty(B, H, L, c["E"], dtype=c["dtype"])
        k, v = torch.empty_like(q), torch.empty_like(q)
        bias = torch.empty(B, H, L, L, dtype=c["dtype"]) if c["bias"] else None
        wl, wr = c["window"]
        out, lse = ta._fwd_op(q, k, v, bias, c["dropout"], 0.125, wl, wr, 0, c["softcap"], 1)
        ta._bwd_op(torch.empty_like(out), q, k, v, out, torch.zeros(B, H, L), bias, c["dropout"], 0.125, wl, wr,
                   0, c["softcap"], 1)
        # packed sequences
        cu = torch.tensor([0, 100, L], dtype=torch.int32)
        qv = torch.empty(L, H, c["E"], dtype=c["dtype"])
        out, lse = ta._varlen_fwd_op(qv, qv, qv, cu, cu, 156, 156, c["dropout"], 0.125, wl, wr, False,
                                     c["softcap"], 1)
        ta._varlen_bwd_op(torch.empty_like(out), qv, qv, qv, out, torch.zeros(H, L), cu, cu, 156, 156,
                          c["dropout"], 0.125, wl, wr, False, c["softcap"], 1)
        # decoding: one query row against a long cache (the split-KV kernels; the chunk is forced, as the
        # plan would otherwise ask the absent GPU for its SM count)
        qd = torch.empty(B, H, 1, c["E"], dtype=c["dtype"])
        kd = torch.empty(B, H // 2, 4096, c["E"], dtype=c["dtype"])
        forced, ta._decode_chunk_forced = ta._decode_chunk_forced, 1024
        try:
            ta._fwd_op(qd, kd, kd, None, 0.0, 0.125, -1, -1, 4095, 0.0, 1)
        finally:
            ta._decode_chunk_forced = forced


def _run_conv2d(full: bool) -> None:
    from fastattn.triton import conv2d as tc
    for dtype in ([torch.float16, torch.bfloat16, torch.float32] if full else [torch.float16, torch.float32]):
        x = torch.empty(2, 32, 16, 16, dtype=dtype)
        w = torch.empty(64, 32, 3, 3, dtype=dtype)
        for act in ([0, 1, 2, 3] if full else [0, 1]):
            out, pre = tc.triton_conv2d_fwd(x, w, torch.empty(64, dtype=dtype), [1, 1], [1, 1, 1, 1], [1, 1], 1,
                                            act, act != 0)
            tc.triton_conv2d_bwd(torch.empty_like(out), x, w, pre if act else None, [1, 1], [1, 1, 1, 1], [1, 1],
                                 1, act, [True, True, True])


def _run_lstm(full: bool) -> None:
    from fastattn.triton import lstm as tlstm
    for H in ([50, 256, 1024] if full else [256]):
        gates, c = torch.empty(8, 4 * H), torch.empty(8, H)
        h_out, c_out, act = tlstm.lstm_gates_fwd(gates, c)
        tlstm.lstm_gates_bwd(torch.empty_like(h_out), torch.empty_like(c_out), act, c_out, c)


def _run_optim(full: bool) -> None:
    from fastattn.triton import optim as to
    for dtype, master in [(torch.float32, False), (torch.float16, True), (torch.bfloat16, False)][: 3 if full else 2]:
        ps = [torch.zeros(100, dtype=dtype), torch.zeros(7, dtype=dtype)]
        gs = [torch.zeros_like(p) for p in ps]
        st = [torch.zeros_like(p, dtype=torch.float32 if master else dtype) for p in ps]
        ms = [torch.zeros_like(p, dtype=torch.float32) for p in ps] if master else []
        to.sgd_step_triton(ps, gs, st, [True, False], 0.1, 0.9, 0.0, 0.01, True, False, None, None, None, ms)
        to.adam_step_triton(ps, gs, st, [torch.zeros_like(s) for s in st], [], [torch.zeros(()) for _ in ps],
                            1e-3, 0.9, 0.999, 1e-8, 0.01, False, False, True, None, None, None, ms)


def _run_linear(full: bool) -> None:
    from fastattn.triton import linear as tl_
    for dtype in ([torch.float16, torch.bfloat16, torch.float32] if full else [torch.float16, torch.float32]):
        M, N, K = 8192, 256, 128  # M > 4096: the split column sum too
        x, w, b = torch.empty(M, K, dtype=dtype), torch.empty(N, K, dtype=dtype), torch.empty(N, dtype=dtype)
        for act in ([0, 1, 2, 3] if full else [0, 2]):
            out, pre = tl_.triton_linear_fwd(x, w, b if act != 1 else None, act, act in (2, 3))
            saved = out if act == 1 else pre if act else None
            tl_.triton_linear_bwd(torch.empty_like(out), x, w, saved, act, [True, True, True])


OPS = {"attention": _run_attention, "conv2d": _run_conv2d, "lstm": _run_lstm, "optim": _run_optim,
       "linear": _run_linear}


def compile_all(arch: int, full: bool = False, ops=None, all_configs: bool = True) -> List[dict]:
    """Compile the kernels our ops launch for ``cuda:<arch>``; one log entry per launch."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("fastattn.triton.aot must run without TRITON_INTERPRET=1")
    log: List[dict] = []
    with compiling_for(arch, log, all_configs):
        for name in ops or OPS:
            OPS[name](full)
    return log


def failures(log: List[dict]) -> List[str]:
    """What failed: a kernel that did not compile, or a launch none of whose configs fits shared memory."""
    bad = []
    for launch in log:
        for r in launch["results"]:
            if not r["ok"]:
                bad.append(f"{r['kernel']} {r['config']} {r['options']}: {r['error']}")
        if all(r["ok"] for r in launch["results"]) and not any(r["fits"] for r in launch["results"]):
            bad.append(f"{launch['launch']}: no config fits the shared memory")
    return bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    p.add_argument("--full", action="store_true", help="every dtype / head size / feature combination")
    p.add_argument("--first-config", action="store_true",
                   help="only the first config of each autotune list (a quick check, e.g. for CI)")
    p.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of " + ",".join(OPS))
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    log = compile_all(args.arch, args.full, args.ops.split(","), all_configs=not args.first_config)
    n = sum(len(launch["results"]) for launch in log)
    over = [r for launch in log for r in launch["results"] if r["ok"] and not r["fits"]]
    for launch in log:
        for r in launch["results"]:
            state = "ok " if r["ok"] and r["fits"] else "big" if r["ok"] else "ERR"
            print(f"{state} {r['kernel']:28s} {r['config']} {r['options']} shared={r.get('shared', '-')}"
                  f" {r['seconds']:.1f}s" + ("" if r["ok"] else "  " + r["error"]))
    bad = failures(log)
    print(f"\nsm_{args.arch}: {n} kernel variants compiled in {time.perf_counter() - t0:.0f} s; "
          f"{len(over)} over the shared-memory limit (skipped by the autotuner); {len(bad)} failures")
    for b in bad:
        print("FAILED:", b)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
