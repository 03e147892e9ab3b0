"""sam2fewshot: the command line of the engine (segment, batch, review, library, models, bench, demo).

Every failure the user can act on ends as one line on stderr and a non-zero exit code; no
partial output file is ever left behind.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from .. import __version__
from ..common.errors import InputError, SAM2FewShotError

EXIT_ERROR = 2


class Parser(argparse.ArgumentParser):
    """Bad options are refused like every other input: one line on stderr, exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_ERROR, f"sam2fewshot: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    from .batch import add_batch_parser
    from .bench import add_bench_parser
    from .demo import add_demo_parser
    from .library import add_library_parser
    from .models import add_models_parser
    from .options import HelpFormatter, add_console_args
    from .review import add_review_parser
    from .segment import add_segment_parser

    parser = Parser(prog="sam2fewshot", formatter_class=HelpFormatter,
                    description="Few-shot 3D segmentation with SAM2. 'sam2fewshot COMMAND --help' for each command.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_console_args(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)
    add_segment_parser(sub)
    add_models_parser(sub)
    add_demo_parser(sub)
    add_bench_parser(sub)
    add_library_parser(sub)
    add_batch_parser(sub)
    add_review_parser(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: whatever was being written is removed, and the exit code says so."""


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a bad option (already said in one line)
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    restore = _on_sigterm(), _console_log(args.verbose)
    try:
        if not args.verbose:
            quiet_native_warnings()
        return run_command(args)
    except SAM2FewShotError as exc:
        print(f"sam2fewshot: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except Terminated:
        print("sam2fewshot: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("sam2fewshot: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("sam2fewshot: error: out of memory: try a smaller model, --image-size or --device cpu", file=sys.stderr)
        return EXIT_ERROR
    finally:
        for undo in restore:
            undo()


def _console_log(verbose: bool):
    """The engine's messages on stderr, a line each (INFO ones too with --verbose), whatever logging the
    host process set up; returns the undo."""
    logger = logging.getLogger(__package__.partition(".")[0])
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.addHandler(handler)
    logger.propagate = False

    def undo() -> None:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate

    return undo


def quiet_native_warnings() -> None:
    """ITK's and GDCM's warnings go to the terminal from C++, around our one-line errors: off
    unless --verbose (the errors themselves keep their reason)."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(False)


def _on_sigterm():
    """SIGTERM raises Terminated in the main thread (a run cleans up as on Ctrl-C); returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    return lambda: signal.signal(signal.SIGTERM, previous)


def run_command(args: argparse.Namespace) -> int:
    if args.command == "segment":
        from .segment import run_segment

        return run_segment(args)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(args)
    if args.command == "bench":
        from .bench import run_bench

        return run_bench(args)
    if args.command == "models":
        from .models import run_models

        return run_models(args)
    if args.command == "batch":
        from .batch import run_batch

        return run_batch(args)
    if args.command == "library":
        from .library import run_library

        return run_library(args)
    if args.command == "review":
        from .review import run_review

        return run_review(args)
    raise InputError(f"unknown command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
