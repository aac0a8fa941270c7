"""The ``asyncckpt`` command line: list, inspect, verify, export and clean up checkpoints.

Every sub-command reads checkpoints the way ``resume`` does: through the validated manifest,
never unpickling anything.  Results go to stdout; progress bars and errors go to stderr.
Expected failures (a missing root or step, a corrupt checkpoint, a bad option) print one line,
``asyncckpt: error: ...``, and exit nonzero.  This module parses; ``commands.py`` prints.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import AsyncCheckpointError, ConfigError
from .commands import (
    _OPTIONS,
    EXIT_FAIL,
    EXIT_USAGE,
    _one_line,
    cmd_bench,
    cmd_export,
    cmd_gc,
    cmd_inspect,
    cmd_ls,
    cmd_verify,
)

__all__ = ["main", "build_parser"]


def _parse_age(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    try:
        value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid age {text!r}; use e.g. 0, 90s, 30m, 1h, 2d") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid age {text!r}: must be >= 0")
    return value


# --------------------------------------------------------------------------- parser


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _size_arg(text: str) -> str:
    from ..export import parse_size

    try:
        parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command except ``demo`` (which parses its own)."""
    from .. import __version__

    p = argparse.ArgumentParser(prog="asyncckpt", description="Asynchronous PyTorch checkpoints.")
    p.add_argument("--version", action="version", version=f"asyncckpt {__version__}")
    p.add_argument(
        "--storage-options",
        metavar="JSON",
        default=None,
        help="fsspec options for URL roots, e.g. credentials or "
        '\'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}\' '
        "(default: $ASYNCCKPT_STORAGE_OPTIONS)",
    )
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.add_parser("demo", help="train, crash mid-save, resume bit-exactly; compare stalls", add_help=False)

    def add(name: str, help: str, description: str, func: Callable[[argparse.Namespace], int]) -> Any:
        sp = sub.add_parser(name, help=help, description=description)
        sp.set_defaults(func=func, parser=sp)
        return sp

    def step_args(sp: Any) -> None:
        sp.add_argument(
            "path", metavar="ROOT[/step_XXXXXXXXX]", help="a checkpoint root or one step directory"
        )
        sp.add_argument("--step", type=int, default=None, help="pick step N under ROOT (default: the newest)")

    sp = add(
        "ls", "list committed checkpoints and uncommitted leftovers",
        "List the committed checkpoints under ROOT (step, tier, commit time, size, metrics), "
        "then any uncommitted leftovers (interrupted saves, step directories without a valid manifest).",
        cmd_ls,
    )  # fmt: skip
    sp.add_argument("root", metavar="ROOT")
    sp.add_argument("--json", action="store_true", help='print {"checkpoints": [...], "leftovers": [...]}')

    sp = add(
        "inspect", "show a checkpoint's manifest, plain values and tensors",
        "Show one checkpoint (default: the newest committed under ROOT): manifest fields, metrics, "
        "the plain values saved in the state (by dotted path) and every tensor's dtype, shape and size.",
        cmd_inspect,
    )  # fmt: skip
    step_args(sp)
    sp.add_argument("--json", action="store_true", help="print everything as one JSON object")

    sp = add(
        "verify", "check every file and checksum of a checkpoint",
        "Read every byte of a checkpoint and check file sizes, crc32 checksums and that the stored "
        "blobs tile each shard. Exits 0 only if every file checks.",
        cmd_verify,
    )  # fmt: skip
    step_args(sp)
    sp.add_argument("--all", action="store_true", help="verify every committed checkpoint under ROOT")

    sp = add(
        "export", "write the tensors as safetensors (sharded past --max-shard-size) or plain DCP",
        "Write a checkpoint's tensors to OUT/model.safetensors, or, when they exceed --max-shard-size, "
        "to a Hugging Face sharded set (model-00001-of-0000N.safetensors + model.safetensors.index.json). "
        "Reads one output shard's tensors at a time; checksums are verified while reading.",
        cmd_export,
    )  # fmt: skip
    step_args(sp)
    sp.add_argument("out", metavar="OUT", help="output directory (created if needed)")
    sp.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                    help="cast floating-point tensors (default: keep the saved dtype)")  # fmt: skip
    sp.add_argument("--only", nargs="+", action="extend", metavar="PREFIX", default=None,
                    help="keep tensors whose name starts with one of these prefixes, e.g. --only model. "
                         "(give OUT before --only, or repeat --only per prefix)")  # fmt: skip
    sp.add_argument("--strip-prefix", metavar="PREFIX", default=None,
                    help="remove PREFIX from tensor names (default: the --only prefix when there is exactly "
                         "one and it ends with '.'; '' keeps names as they are)")  # fmt: skip
    sp.add_argument("--max-shard-size", type=_size_arg, default="5GB", metavar="SIZE",
                    help="largest output file before sharding, e.g. 5GB (10^9), 2GiB (2^30) (default 5GB)")  # fmt: skip
    sp.add_argument("--force", action="store_true", help="replace an earlier export in OUT")
    sp.add_argument("--format", choices=["safetensors", "dcp"], default="safetensors",
                    help="safetensors (default), or dcp: a plain torch.distributed.checkpoint directory "
                         "that stock dcp.load reads (e.g. from a compressed or differential step)")  # fmt: skip

    sp = add(
        "gc", "remove uncommitted leftovers; apply retention",
        "Remove uncommitted leftovers (interrupted saves under .tmp/, step directories without a valid "
        "manifest), abort the multipart uploads that killed writers left under ROOT on S3, and, when a --keep option is given, delete the committed checkpoints that no --keep "
        "option keeps (a checkpoint survives if any of them keeps it). The newest checkpoint and the "
        "steps in ROOT/.protected.json are never deleted; snapshots are not touched. A deletion first "
        "moves the step out of the way (into .tmp/), so an interrupted gc never leaves a half-deleted "
        "checkpoint that looks committed.",
        cmd_gc,
    )  # fmt: skip
    sp.add_argument("root", metavar="ROOT")
    sp.add_argument("--dry-run", action="store_true", help="print what would be removed; change nothing")
    sp.add_argument("--keep-last", type=_positive(int), metavar="K", default=None,
                    help="keep the K newest checkpoints")  # fmt: skip
    sp.add_argument("--keep-every", type=_positive(int), metavar="K", default=None,
                    help="keep every step divisible by K")  # fmt: skip
    sp.add_argument("--keep-best", type=_positive(int), metavar="K", default=None,
                    help="keep the K checkpoints with the best --metric")  # fmt: skip
    sp.add_argument("--metric", metavar="NAME", default=None, help="metric for --keep-best, e.g. loss")
    sp.add_argument("--mode", choices=["min", "max"], default="min",
                    help="for --keep-best: min (lower is better, default) or max")  # fmt: skip
    sp.add_argument("--min-age", type=_parse_age, default=3600.0, metavar="AGE",
                    help="leave leftovers that changed (and multipart uploads begun) more recently than AGE "
                         "alone, since they may be a save in progress; on object stores, where a leftover's "
                         "age is unknown, only --min-age 0 removes it (default 1h; e.g. 0, 30m, 2d)")  # fmt: skip

    sp = add(
        "bench", "measure the trainer stall per save against torch.save and DCP",
        "Save the same synthetic state with torch.save, dcp.save, dcp.async_save (fresh and reused "
        "stager) and asyncckpt (overlap off and on), time the call that blocks the trainer, and print "
        "each method's stall against the floor of one copy_ into touched buffers.",
        cmd_bench,
    )  # fmt: skip
    sp.add_argument("--size-gib", type=_positive(float), default=None,
                    help="state size in GiB (default 1.0; --quick: 1/16)")  # fmt: skip
    sp.add_argument(
        "--tensors", type=_positive(int), default=100, help="number of fp32 tensors (default 100)"
    )
    sp.add_argument(
        "--reps", type=_positive(int), default=None, help="repetitions per method (default 5; --quick 3)"
    )
    sp.add_argument("--dir", default=None, help="parent directory for the temporary checkpoints")
    sp.add_argument("--json", metavar="PATH", default=None, help="also write the full results to PATH")
    sp.add_argument("--quick", action="store_true", help="smoke test: 64 MiB, 3 reps")
    return p


@contextlib.contextmanager
def _quiet_broken_pipe() -> Iterator[None]:
    try:
        yield
    except BrokenPipeError:  # `asyncckpt ls ROOT | head`: not an error
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        raise


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``asyncckpt`` console script and of ``python -m asyncckpt``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        p.print_help()
        return 0 if argv else 2
    if argv[0] == "demo":
        from ..demo import main as demo_main

        return demo_main(argv[1:])
    try:
        args, extra = p.parse_known_args(argv)
        if getattr(args, "func", None) is None:
            p.error("choose a COMMAND")
        if extra:  # reported by the sub-command's parser, so its usage line is the one shown
            args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # argparse has printed its usage line and message
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    try:
        _OPTIONS.load(args.storage_options)
        with _quiet_broken_pipe():
            return int(args.func(args))
    except BrokenPipeError:
        return 141
    except KeyboardInterrupt:
        print("asyncckpt: interrupted", file=sys.stderr)
        return 130
    except (AsyncCheckpointError, OSError) as e:
        print(f"asyncckpt: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
