"""The ``fastattn`` command: ``info``, ``bench``, ``train``, ``generate``."""
from __future__ import annotations

import argparse
import json
import os
import runpy
import sys

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def run_bench(op: str, rest) -> int:
    """Run benchmarks/bench_<op>.py (they live in the source tree, next to the package)."""
    path = os.path.join(BENCH_DIR, f"bench_{op}.py")
    if not os.path.exists(path):
        have = sorted(f[6:-3] for f in os.listdir(BENCH_DIR) if f.startswith("bench_")) if os.path.isdir(BENCH_DIR) else []
        print(f"fastattn bench: no benchmark {op!r} ({'have: ' + ', '.join(have) if have else 'benchmarks/ ships with the source tree only'})",
              file=sys.stderr)
        return 2
    sys.argv = [path] + list(rest)
    sys.path.insert(0, BENCH_DIR)
    runpy.run_path(path, run_name="__main__")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, ISA, compiled CUDA archs, GPU, backend per op")
    p_info.add_argument("--json", action="store_true", help="print JSON")
    p_bench = sub.add_parser("bench", help="ours vs torch for one op (attention, conv2d, lstm, optim, models); "
                                           "extra arguments go to the benchmark (e.g. --quick)")
    p_bench.add_argument("op")
    p_bench.add_argument("args", nargs=argparse.REMAINDER)

    from fastattn import train
    p_train = sub.add_parser("train", help="train a model (cnn, rnn, seq2seq, lm); works under torchrun",
                             description=train.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_train_args(p_train)
    p_gen = sub.add_parser("generate", help="sample from a trained lm (or transform with a seq2seq) checkpoint")
    train.add_generate_args(p_gen)
    args = parser.parse_args(argv)

    if args.command == "info":
        from fastattn.info import format_info, info
        d = info()
        print(json.dumps(d, indent=2) if args.json else format_info(d))
        return 0
    if args.command == "bench":
        return run_bench(args.op, args.args)
    if args.command in ("train", "generate"):
        return train.run_command(args.command, args, p_train if args.command == "train" else p_gen)
    return 2


if __name__ == "__main__":
    sys.exit(main())
