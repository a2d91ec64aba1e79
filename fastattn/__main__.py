"""The ``fastattn`` command: ``info`` (and, as they land, ``bench``, ``train``, ``generate``)."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, ISA, compiled CUDA archs, GPU, backend per op")
    p_info.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)

    if args.command == "info":
        from fastattn.info import format_info, info
        d = info()
        print(json.dumps(d, indent=2) if args.json else format_info(d))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
