"""`reup delta`: write a stream for a device holding some closures, towards a target.

Registered by reup/cli.py; the work is done by delta/encode.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..nix import resolve_store_path
from .encode import encode


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "delta", help="write a reup stream from the --from closures to the --to closure"
    )
    p.add_argument("--from", dest="held", nargs="*", default=[], metavar="PATH",
                   help="store paths (or links to them) whose closures the device holds; none: fresh install")
    p.add_argument("--staged", nargs="*", default=[], metavar="PATH",
                   help="store paths the device has staged and verified already (not sent again)")
    p.add_argument("--to", dest="target", required=True, metavar="PATH", help="target toplevel")
    p.add_argument("-o", "--output", required=True, help="stream file to write")
    p.add_argument("--stats", action="store_true", help="print statistics as JSON on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        held = [resolve_store_path(p) for p in args.held]
        target = resolve_store_path(args.target)
    except ValueError as exc:
        print(f"reup delta: {exc}", file=sys.stderr)
        return 2
    stats = encode(held, target, args.output, staged=args.staged)
    if args.stats:
        json.dump(stats.to_json(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    return 0
