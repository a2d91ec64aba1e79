"""Shared benchmark helpers: timing, machine description, markdown tables, PNG plots.

Every ``bench_<op>.py`` times ours and torch's on the same shapes in the same run:

    args = common.parser("attention").parse_args()
    table = common.Table("attention", ["case", "impl", "ms", "GFLOP/s", "vs torch"])
    t_ours = common.bench(lambda: ours(x), device)
    t_torch = common.bench(lambda: torch_fn(x), device)
    table.add(case=..., impl="fastattn cpu", ms=t_ours * 1e3, **{"GFLOP/s": flops / t_ours / 1e9,
              "vs torch": t_torch / t_ours})
    table.finish(args, plot=dict(x="case", y="GFLOP/s", group="impl"))

``finish`` prints the markdown table and writes ``<out>/<name>.md``, ``.csv`` and ``.png``
(``--out``, default ``benchmarks/out``). Ratios are torch time / our time: > 1 means we are faster.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def parser(name: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=f"fastattn {name} benchmark: ours vs torch, same run")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="a few small cases (smoke run)")
    p.add_argument("--out", default=os.path.join(HERE, "out"), help="folder for the .md/.csv/.png")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds of timing per measurement")
    return p


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bench(fn: Callable[[], object], device="cpu", min_time: float = 0.3, warmup: int = 2,
          cpu_time: bool = False) -> float:
    """Median seconds per call of ``fn``.

    GPU: ``triton.testing.do_bench`` when triton is installed (it flushes L2 and uses CUDA events),
    else CUDA events. CPU: wall clock over enough repeats to fill ``min_time``, median of 5 rounds;
    ``cpu_time=True`` uses the process CPU clock instead (all threads of this process: with one
    thread, other jobs on a shared machine cost little, while the wall clock counts their slices).
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        try:
            from triton.testing import do_bench
            return do_bench(fn, warmup=25, rep=max(int(min_time * 1000), 50)) / 1e3
        except ImportError:
            pass
    clock = time.process_time if cpu_time and dev.type == "cpu" else time.perf_counter
    for _ in range(warmup):
        fn()
    sync(dev)
    t0 = clock()
    fn()
    sync(dev)
    once = max(clock() - t0, 1e-6)
    reps = max(1, int(min_time / 5 / once))
    rounds = []
    for _ in range(5):
        t0 = clock()
        for _ in range(reps):
            fn()
        sync(dev)
        rounds.append((clock() - t0) / reps)
    return statistics.median(rounds)


def machine(device="cpu") -> str:
    """One line naming where the figures came from."""
    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = _cpu_name()
        try:
            from fastattn import _ext
            if _ext._C is not None:
                name += f", kernels: {_ext._C.cpu_isa()}"
        except ImportError:
            pass
        name += f", {torch.get_num_threads()} threads"
    return f"{name}; torch {torch.__version__}; python {platform.python_version()}"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fmt(v) -> str:
    if isinstance(v, float):
        if v == 0 or 0.01 <= abs(v) < 1e5:
            return f"{v:.2f}" if abs(v) < 100 else f"{v:.1f}"
        return f"{v:.3g}"
    return str(v)


class Table:
    def __init__(self, name: str, columns: Sequence[str]):
        self.name = name
        self.columns = list(columns)
        self.rows: List[Dict[str, object]] = []

    def add(self, **row) -> None:
        self.rows.append(row)
        print("  " + "  ".join(f"{k}={fmt(v)}" for k, v in row.items()), flush=True)

    def markdown(self) -> str:
        head = "| " + " | ".join(self.columns) + " |"
        sep = "|" + "|".join("---" for _ in self.columns) + "|"
        body = ["| " + " | ".join(fmt(r.get(c, "")) for c in self.columns) + " |" for r in self.rows]
        return "\n".join([head, sep] + body)

    def finish(self, args, plot: Optional[dict] = None, note: str = "") -> str:
        os.makedirs(args.out, exist_ok=True)
        text = f"### {self.name}\n\nMachine: {machine(args.device)}\n\n{note + chr(10) + chr(10) if note else ''}{self.markdown()}\n"
        print("\n" + text)
        with open(os.path.join(args.out, f"{self.name}.md"), "w") as f:
            f.write(text)
        with open(os.path.join(args.out, f"{self.name}.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(self.rows)
        if plot:
            self.plot(os.path.join(args.out, f"{self.name}.png"), **plot)
        return text

    def plot(self, path: str, x: str, y: str, group: str, title: Optional[str] = None) -> None:
        """Grouped bar chart of column ``y`` per ``x``, one bar per ``group`` value."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib not installed: no plot")
            return
        xs = list(dict.fromkeys(str(r[x]) for r in self.rows if y in r))
        groups = list(dict.fromkeys(str(r[group]) for r in self.rows if y in r))
        width = 0.8 / max(len(groups), 1)
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(xs) * max(1, len(groups)) / 2 + 3), 4.5))
        for gi, g in enumerate(groups):
            vals = []
            for xv in xs:
                match = [r[y] for r in self.rows if str(r[x]) == xv and str(r[group]) == g and y in r]
                vals.append(float(match[0]) if match else 0.0)
            ax.bar([i + gi * width for i in range(len(xs))], vals, width, label=g)
        ax.set_xticks([i + width * (len(groups) - 1) / 2 for i in range(len(xs))])
        ax.set_xticklabels(xs, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(y)
        ax.set_title(title or f"{self.name}: {y}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
