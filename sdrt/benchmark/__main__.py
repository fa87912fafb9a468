"""``python -m sdrt.benchmark OUT [options]``: the ``sdrt bench`` command on its own."""
from __future__ import annotations

import argparse
import logging
import sys

from ..errors import SdrtError
from . import add_parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdrt.benchmark")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    argv = sys.argv[1:] if argv is None else argv
    verbose = [a for a in argv if a in ("-v", "--verbose")]
    args = parser.parse_args([*verbose, "bench", *(a for a in argv if a not in verbose)])
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.run(args) or 0
    except SdrtError as e:
        print(f"sdrt bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
