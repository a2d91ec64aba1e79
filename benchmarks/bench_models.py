"""Training-step time of each model, impl=fastattn vs impl=torch, same run, same weights and batch.

    python benchmarks/bench_models.py [--quick] [--device cuda] [--models cnn,lm] [--threads 2] [--cpu-time]

One step = forward, loss, backward, optimizer step (Adam from fastattn.optim vs torch.optim), at
the default training batch of ``fastattn train``. "vs torch" = torch's time / ours (> 1: we are faster).

On CPU the two models are timed in alternating rounds (torch, ours, torch, ours, ...), so a load
change on a shared machine hits both sides alike; "ms/step" is each side's median round and
"vs torch" the median of the rounds' ratios. ``--cpu-time`` uses the process CPU clock instead of
the wall clock (meaningful with ``--threads 1``: other jobs' time slices then cost nothing).
"""
from __future__ import annotations

import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import common  # noqa: E402
from fastattn.models import ConvNet, LSTMClassifier, Seq2SeqTransformer, TransformerLM, modules  # noqa: E402

warnings.filterwarnings("ignore", message="enable_nested_tensor is True")


def case(name: str, quick: bool):
    """(model constructor taking impl, batch, loss function, samples per step)."""
    g = torch.Generator().manual_seed(0)
    if name == "cnn":
        b = 8 if quick else 32
        x, y = torch.rand(b, 3, 64, 64, generator=g), torch.randint(0, 10, (b,), generator=g)
        return (lambda impl: ConvNet(impl=impl)), (x,), lambda out: F.cross_entropy(out, y), b
    if name == "rnn":
        b = 64
        x, y = torch.rand(b, 8, 8, generator=g), torch.randint(0, 10, (b,), generator=g)
        return (lambda impl: LSTMClassifier(impl=impl)), (x,), lambda out: F.cross_entropy(out, y), b
    if name == "seq2seq":
        b = 32 if quick else 128
        src = torch.randint(3, 13, (b, 12), generator=g)
        tgt = torch.cat([torch.ones(b, 1, dtype=torch.long), src.flip(1), torch.full((b, 1), 2)], 1)
        return ((lambda impl: Seq2SeqTransformer(14, impl=impl)), (src, tgt[:, :-1]),
                lambda out: F.cross_entropy(out.reshape(-1, 14), tgt[:, 1:].reshape(-1)), b)
    b = 16 if quick else 64
    x = torch.randint(0, 100, (b, 65), generator=g)
    return ((lambda impl: TransformerLM(100, impl=impl)), (x[:, :-1],),
            lambda out: F.cross_entropy(out.reshape(-1, 100), x[:, 1:].reshape(-1)), b)


def step_fn(model, inputs, loss_fn, opt):
    def step():
        loss = loss_fn(model(*inputs))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def interleaved(steps, min_time: float, cpu_time: bool, rounds: int = 9):
    """Median seconds per step of each of ``steps`` (timed in alternating rounds) and the median of
    the per-round ratios ``steps[0] / steps[i]``."""
    clock = time.process_time if cpu_time else time.perf_counter
    for fn in steps:
        for _ in range(2):
            fn()
    t0 = clock()
    for fn in steps:
        fn()
    reps = max(1, int(min_time / rounds / max(clock() - t0, 1e-6)))  # the rounds fill about min_time
    times = [[] for _ in steps]
    for _ in range(rounds):
        for fn, ts in zip(steps, times):
            t0 = clock()
            for _ in range(reps):
                fn()
            ts.append((clock() - t0) / reps)
    ratios = [statistics.median(a / b for a, b in zip(times[0], ts)) for ts in times]
    return [statistics.median(ts) for ts in times], ratios


def main() -> None:
    p = common.parser("models")
    p.add_argument("--models", default="cnn,rnn,seq2seq,lm")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--cpu-time", action="store_true", help="process CPU clock instead of wall clock (CPU only)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    table = common.Table("models", ["model", "impl", "ms/step", "samples/s", "vs torch", "note"])
    for name in args.models.split(","):
        make, inputs, loss_fn, batch = case(name, args.quick)
        inputs = tuple(t.to(dev) for t in inputs)
        torch.manual_seed(0)
        ref = make("torch").to(dev)
        torch_step = step_fn(ref, inputs, loss_fn, torch.optim.Adam(ref.parameters(), lr=1e-4))
        try:
            ours = make("fastattn").to(dev)
            ours.load_state_dict(ref.state_dict())
            opt = modules("fastattn").Adam(ours.parameters(), lr=1e-4)
        except RuntimeError as e:  # a fastattn module this build does not have yet
            t_torch = common.bench(torch_step, dev, args.min_time)
            table.add(model=name, impl="torch", **{"ms/step": t_torch * 1e3, "samples/s": batch / t_torch,
                                                  "vs torch": 1.0, "note": ""})
            table.add(model=name, impl="fastattn", note=str(e).split(",")[0])
            continue
        ours_step = step_fn(ours, inputs, loss_fn, opt)
        if dev.type == "cpu":
            (t_torch, t_ours), (_, ratio) = interleaved([torch_step, ours_step], 2 * args.min_time, args.cpu_time)
        else:
            t_torch, t_ours = common.bench(torch_step, dev, args.min_time), common.bench(ours_step, dev, args.min_time)
            ratio = t_torch / t_ours
        table.add(model=name, impl="torch", **{"ms/step": t_torch * 1e3, "samples/s": batch / t_torch,
                                              "vs torch": 1.0, "note": ""})
        table.add(model=name, impl="fastattn", **{"ms/step": t_ours * 1e3, "samples/s": batch / t_ours,
                                                 "vs torch": ratio, "note": ""})
    clock = "process CPU time" if args.cpu_time else "wall clock"
    table.finish(args, plot=dict(x="model", y="ms/step", group="impl"),
                 note=f"One training step (forward + loss + backward + Adam step) at the default batch; {clock}"
                      f"{', torch and fastattn in alternating rounds' if dev.type == 'cpu' else ''}.")


if __name__ == "__main__":
    main()
