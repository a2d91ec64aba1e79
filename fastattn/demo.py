"""``python -m fastattn.demo`` (``make demo``): the seed CNN, the seed RNN and a small Transformer LM,
each trained briefly on the CPU with ``impl=fastattn`` and with ``impl=torch``; prints a table of
loss / accuracy and time per training step, writes each run's ``metrics.png`` and ``demo.png``.

    python -m fastattn.demo [--out runs/demo] [--quick] [--device cpu] [--models cnn,rnn,lm]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

from fastattn import train

# Brief runs: (arguments of `fastattn train`, what the accuracy column means)
RUNS = {
    "cnn": (["cnn", "--epochs", "3", "--train-limit", "768"], "test accuracy"),
    "rnn": (["rnn", "--epochs", "12"], "test accuracy"),
    "lm": (["lm", "--epochs", "1", "--train-limit", "3200", "--lr", "3e-3", "--model-kwargs",
            '{"d_model": 96, "num_layers": 2, "dim_feedforward": 384}'], "test next-char accuracy"),
}
QUICK = {"cnn": ["--epochs", "1", "--train-limit", "256"], "rnn": ["--epochs", "3"],
         "lm": ["--epochs", "1", "--train-limit", "512"]}


def run_one(model: str, impl: str, out: str, device: str, quick: bool, threads=None) -> dict:
    argv, _ = RUNS[model]
    argv = list(argv)
    if quick:
        argv += QUICK[model]
    argv += ["--impl", impl, "--device", device, "--out", os.path.join(out, f"{model}-{impl}"), "--no-progress"]
    if threads:
        argv += ["--threads", str(threads)]
    p = argparse.ArgumentParser()
    train.add_train_args(p)
    t0 = time.perf_counter()
    try:
        summary = train.train(train.finish_args(p.parse_args(argv)))
    except train.TrainError as e:
        return {"model": model, "impl": impl, "note": str(e).split(";")[0]}
    last = summary["history"][-1]
    steps = [r["step_time_ms"] for r in summary["history"]]
    return {"model": model, "impl": impl, "epochs": len(summary["history"]), "steps": summary["global_step"],
            "test_loss": summary["test"]["loss"], "test_acc": summary["test"]["acc"], "val_loss": last["val_loss"],
            "ms_per_step": min(steps), "wall_s": time.perf_counter() - t0, "unigram": summary.get("unigram"),
            "note": ""}


def table(rows) -> str:
    head = "| model | impl | epochs | steps | test loss | accuracy | ms/step | speed-up vs torch | wall s | note |"
    lines = [head, "|" + "---|" * 10]
    torch_ms = {r["model"]: r.get("ms_per_step") for r in rows if r["impl"] == "torch"}
    for r in rows:
        if "test_loss" not in r:
            lines.append(f"| {r['model']} | {r['impl']} | | | | | | | | {r['note']} |")
            continue
        speed = torch_ms.get(r["model"])
        speed = f"{speed / r['ms_per_step']:.2f}x" if speed else ""
        note = f"unigram baseline {r['unigram']:.3f}" if r.get("unigram") else r["note"]
        lines.append(f"| {r['model']} | {r['impl']} | {r['epochs']} | {r['steps']} | {r['test_loss']:.4f} | "
                     f"{r['test_acc']:.4f} | {r['ms_per_step']:.1f} | {speed} | {r['wall_s']:.0f} | {note} |")
    return "\n".join(lines)


def plot(rows, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    done = [r for r in rows if "ms_per_step" in r]
    models = list(dict.fromkeys(r["model"] for r in done))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "ms_per_step", "ms per training step"), (axes[1], "test_acc", "test accuracy")):
        for j, impl in enumerate(("fastattn", "torch")):
            vals = [next((r[key] for r in done if r["model"] == m and r["impl"] == impl), 0.0) for m in models]
            ax.bar([i + 0.4 * j for i in range(len(models))], vals, 0.4, label=f"impl={impl}")
        ax.set_xticks([i + 0.2 for i in range(len(models))])
        ax.set_xticklabels(models)
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle("fastattn demo: brief CPU training")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastattn.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join("runs", "demo"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="even briefer runs (a smoke test)")
    p.add_argument("--models", default="cnn,rnn,lm")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is best on a busy machine)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="enable_nested_tensor is True")
    rows = []
    for model in args.models.split(","):
        if model not in RUNS:
            p.error(f"--models: unknown model {model!r} (choose from {', '.join(RUNS)})")
        for impl in ("fastattn", "torch"):
            print(f"\n== {model}, impl={impl}", flush=True)
            rows.append(run_one(model, impl, args.out, args.device, args.quick, args.threads))
    text = table(rows)
    print("\n" + text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "demo.md"), "w") as f:
        f.write(text + "\n")
    plot(rows, os.path.join(args.out, "demo.png"))
    print(f"\nplots: {args.out}/demo.png and {args.out}/<model>-<impl>/metrics.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
