"""The ``fastattn`` command: ``info``, ``train``, ``generate`` (and, as it lands, ``bench``)."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, ISA, compiled CUDA archs, GPU, backend per op")
    p_info.add_argument("--json", action="store_true", help="print JSON")

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
    if args.command in ("train", "generate"):
        return train.run_command(args.command, args, p_train if args.command == "train" else p_gen)
    return 2


if __name__ == "__main__":
    sys.exit(main())
