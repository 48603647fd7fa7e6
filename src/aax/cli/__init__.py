"""The ``aax`` command: a thin layer over the Python API.

Each sub-command lives in its own module of this package and exposes
``register(subparsers)``, which adds its parser and sets ``func(args) -> int``.
Modules are discovered, so adding a command never edits this file.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from aax import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aax",
        description="Pixel-level annotations from image-level labels, with uncertainty and review flags.",
    )
    parser.add_argument("--version", action="version", version=f"aax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``aax`` command; returns its exit status.

    Exit status, for every command: 0 when all went well; 1 when the command finished
    but some inputs could not be used (each is listed with its reason); 2 when it could
    not run (bad options, a folder that is not a RUN, a missing file: one line says
    which); 130 when interrupted. ``AAX_DEBUG=1`` shows the traceback of an error.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from aax.annotation.store import SettingsMismatch
    from aax.runtime import set_threads, tune_allocator
    from aax.scale.cluster import RayMissing

    tune_allocator()  # reuse freed tensor memory: 15-20 % faster on CPU (aax.runtime)
    name = f"aax {args.command}"
    restore = None
    try:
        if hasattr(args, "threads"):  # commands that run the models
            import torch

            restore = torch.get_num_threads()
            set_threads(args.threads)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, SettingsMismatch, RayMissing) as exc:
        if os.environ.get("AAX_DEBUG"):
            raise
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if restore is not None:  # called in-process (tests, notebooks): leave no trace
            from aax.runtime import reset_threads

            reset_threads(restore)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
