"""``aax demo [--out DIR]``: every step of AAX on generated data, in minutes."""

from __future__ import annotations

import argparse

from aax.cli._common import add_device_argument, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="generate data, train, calibrate, annotate, evaluate, report",
                       description="Run the whole of AAX on synthetic chest-X-ray-like data.")
    p.add_argument("--out", default="demo-run", help="output folder (default: demo-run)")
    p.add_argument("--quick", action="store_true", help="a smaller, faster demo (64 px, fewer images)")
    p.add_argument("--epochs", type=positive_int, default=None, help="maximum epochs per member")
    add_device_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from aax.demo import DemoConfig, run_demo

    config = DemoConfig.quick() if args.quick else DemoConfig()
    config.device = args.device
    if args.epochs is not None:
        config.epochs = args.epochs
    run_demo(args.out, config)
    return 0
