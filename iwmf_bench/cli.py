"""The ``iwmf-bench`` command line.

Errors the user can fix (:class:`~iwmf_bench.errors.BenchError`) are printed as one line
``iwmf-bench: error: ...`` with exit code 2 and no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .commands import MODULES
from .devices import resolve_device
from .errors import BenchError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iwmf-bench",
        description="Benchmark adversarial purification (IWMF, IWMF-Diff, DiffPure) for face verification.")
    parser.add_argument("--version", action="version", version=f"iwmf-bench {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in MODULES:
        importlib.import_module(f"{__package__}.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if getattr(args, "device", None) is not None:
            args.device = resolve_device(args.device)
        return int(args.func(args) or 0)
    except BenchError as exc:
        print(f"iwmf-bench: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("iwmf-bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
