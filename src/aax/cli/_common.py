"""Helpers shared by the sub-commands: option types that check their range at parse time
(so a bad value is one line of error and nothing is written), and the ``--device`` and
``--threads`` options of every command that runs the models."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _number(kind: type, low: float | None, high: float | None, low_open: bool = False,
            high_open: bool = False) -> Callable[[str], float | int]:
    """An argparse ``type`` that parses ``kind`` and checks it lies in the range."""
    lo_sym, hi_sym = ("(" if low_open else "["), (")" if high_open else "]")
    span = f"{lo_sym}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi_sym}"

    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be in {span}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = _number(int, 1, None)
"""An integer >= 1 (batch sizes, MC passes, epochs, threads, ports are narrower)."""
non_negative_int = _number(int, 0, None)
"""An integer >= 0 (workers, patience, seeds)."""
unit_float = _number(float, 0.0, 1.0)
"""A number in [0, 1] (theta, tau, flag rates, pass rates)."""
open_unit_float = _number(float, 0.0, 1.0, low_open=True, high_open=True)
"""A number in (0, 1) (validation fraction)."""
dropout_float = _number(float, 0.0, 1.0, high_open=True)
"""A number in [0, 1) (dropout probability)."""
positive_float = _number(float, 0.0, None, low_open=True)
"""A number > 0 (learning rates)."""
non_negative_float = _number(float, 0.0, None)
"""A number >= 0 (loss weights)."""
port_int = _number(int, 1, 65535)


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--threads``: where and with how many CPU threads the models run."""
    parser.add_argument("--device", default=None,
                        help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads for the models (default: the CPUs not busy with other "
                             "work when the command starts; see docs/performance.md)")


def parse_label_map(text: str) -> dict[str, str]:
    """``tb=diseased,health=healthy`` -> ``{"tb": "diseased", "health": "healthy"}``."""
    mapping: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        old, sep, new = item.partition("=")
        old, new = old.strip(), new.strip()
        if not sep or not old or not new:
            raise argparse.ArgumentTypeError(f"{item!r}: expected LABEL=CLASS, e.g. tb=diseased")
        if old in mapping and mapping[old] != new:
            raise argparse.ArgumentTypeError(f"label {old!r} is mapped twice")
        mapping[old] = new
    if not mapping:
        raise argparse.ArgumentTypeError("expected LABEL=CLASS[,LABEL=CLASS...]")
    return mapping


parse_label_map.__name__ = "label map"


def add_label_map_argument(parser: argparse.ArgumentParser) -> None:
    """``--label-map``: rename the labels of a dataset as it is read."""
    parser.add_argument("--label-map", type=parse_label_map, default=None, metavar="LABEL=CLASS,...",
                        help="rename dataset labels as they are read, e.g. tb=diseased,health=healthy "
                             "(labels not named keep their name)")


def add_ray_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """``--ray [ADDRESS]`` and ``--actors N``: run on Ray (``pip install 'aax[ray]'``)."""
    parser.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                        help=f"{what} on Ray: without ADDRESS a Ray instance started on this machine; "
                             "with one (HOST:6379, 'auto' on a node that ran `ray start`) that cluster. "
                             "Needs pip install 'aax[ray]'; see docs/scale.md")
    parser.add_argument("--actors", type=positive_int, default=None, metavar="N",
                        help="with --ray: how many run at once (default: annotate, one actor per GPU or per "
                             "4 CPUs; train, every member). --threads sets CPU threads per actor or task "
                             "(default: the cluster's CPUs shared evenly)")


def add_review_learning_arguments(parser: argparse.ArgumentParser, run_default: bool = False) -> None:
    """The options of learning from reviewed masks (docs/reviews.md), shared by ``aax train``
    and ``aax retrain``; with ``run_default`` each defaults to the RUN's setting first."""

    def default(value: str) -> str:
        return f"default: RUN's, else {value}" if run_default else f"default {value}"

    parser.add_argument("--localisation-weight", type=non_negative_float, default=None,
                        help=f"weight of the localisation loss on reviewed masks ({default('0.1')})")
    parser.add_argument("--localisation-loss", choices=["bce", "spatial"], default=None,
                        help="its form: bce per cell, or spatial (where the map is high, not how high; "
                             f"{default('bce')}; docs/reviews.md)")
    parser.add_argument("--segmentation-weight", type=non_negative_float, default=None,
                        help="weight of the segmentation heads' loss on reviewed masks: from 10 masks, every member "
                             "gets a light segmentation head on its features and the run's masks come from the "
                             f"heads' maps ({default('0.3')}; 0: masks from XGrad-CAM; docs/reviews.md)")
    parser.add_argument("--segmentation-epochs", type=non_negative_int, default=None, metavar="N",
                        help="then refit each segmentation head alone on the reviewed masks for N epochs over the "
                             f"frozen member ({default('60')}; 0: none)")
    parser.add_argument("--segmentation-views", type=non_negative_int, default=None, metavar="N",
                        help="augmented views of each masked image the refit learns from, besides the image and "
                             f"its mirror image ({default('14')}; 0: none)")
