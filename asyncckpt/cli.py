"""The ``asyncckpt`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``asyncckpt`` console script and of ``python -m asyncckpt``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="asyncckpt", description="Asynchronous PyTorch checkpoints.")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.add_parser("demo", help="train, crash mid-save, resume bit-exactly; compare stalls", add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        p.print_help()
        return 0 if argv else 2
    if argv[0] == "demo":
        from .demo import main as demo_main

        return demo_main(argv[1:])
    p.parse_args(argv)  # prints the error for an unknown command
    return 2


if __name__ == "__main__":
    sys.exit(main())
