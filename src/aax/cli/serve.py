"""``aax serve RUN``: a Label Studio ML backend serving AAX's predictions."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

from aax.cli._common import _number, add_device_argument, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve predictions to Label Studio (ML backend protocol)")
    p.add_argument("run", help="RUN folder written by `aax train`")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_number(int, 0, 65535), default=9090, help="port (default 9090; 0 picks a free one)")
    p.add_argument("--images", action="append", default=[], metavar="DIR",
                   help="a folder whose files tasks may name by path (repeatable)")
    p.add_argument("--label-studio-url", default=None,
                   help="Label Studio's address, for images (default: $LABEL_STUDIO_URL); "
                        "the key is read from $LABEL_STUDIO_API_KEY")
    p.add_argument("--store", default=None, metavar="OUT",
                   help="keep the reviews Label Studio's webhook sends (annotations submitted, updated or "
                        "deleted on tasks exported from OUT) in OUT's reviews, as `aax import` does; point a "
                        "Label Studio webhook at http://HOST:PORT/webhook")
    p.add_argument("--max-batch", type=positive_int, default=16, help="tasks per forward pass (default 16)")
    add_device_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from aax.interop.serve import serve

    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        print(f"aax serve: binding to {args.host}: anyone who reaches this address can ask for "
              "predictions (there is no authentication)", file=sys.stderr)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    serve(args.run, args.host, args.port, images=args.images, label_studio_url=args.label_studio_url,
          device=args.device, max_batch=args.max_batch, store=args.store)
    return 0
