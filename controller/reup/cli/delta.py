"""`reup delta`: write a stream for a device holding some closures, towards a target.

Registered by reup/cli.py; the work is done by delta/encode.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Any

from reup_receiver.protocol import stream_version

from reup.delta.encode import encode
from reup.delta.pycsolid import allowed_codecs
from reup.io.nix import resolve_store_path


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "delta", help="write a reup stream from the --from closures to the --to closure"
    )
    p.add_argument("--from", dest="held", nargs="*", action="extend", default=[], metavar="PATH",
                   help="store paths (or links to them) whose closures the device holds; none: fresh install")
    p.add_argument("--staged", nargs="*", action="extend", default=[], metavar="PATH",
                   help="store paths the device has staged and verified already (not sent again)")
    p.add_argument("--to", dest="target", required=True, metavar="PATH", help="target toplevel")
    p.add_argument("-o", "--output", required=True, help="stream file to write")
    p.add_argument("--avoid", nargs="*", action="extend", default=[], metavar="PATH",
                   help="store paths the device reported broken: never used as bases, re-sent if needed")
    p.add_argument("--codecs", metavar="NAMES",
                   help="patch codecs the device can apply, comma-separated (its --status 'codecs')")
    p.add_argument("--cache", metavar="DIR",
                   help="delta cache: a request seen before is served from DIR without encoding")
    p.add_argument("--stats", action="store_true", help="print statistics as JSON on stdout")
    # Repeated flags accumulate (`--from A --from B` holds both), as `--from A B` does.
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        held = [resolve_store_path(p) for p in args.held]
        target = resolve_store_path(args.target)
    except ValueError as exc:
        print(f"reup delta: {exc}", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.codecs.split(",")] if args.codecs else None
    version = stream_version(names)  # the device's capability, as in its status
    try:
        allowed = allowed_codecs(names, strict=True)
    except KeyError as exc:
        print(f"reup delta: unknown codec {exc}", file=sys.stderr)
        return 2
    if args.cache and not args.avoid and allowed is None:
        report = _cached(args.cache, held, target, args.staged, args.output)
    else:
        report = encode(held, target, args.output, staged=args.staged, avoid=args.avoid,
                        allowed_codecs=allowed, version=version).to_json()
    if args.stats:
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
    return 0


def _cached(cache_dir: str, held: list[str], target: str, staged: list[str], output: str) -> dict[str, object]:
    from reup.delta.cache import DeltaCache

    start = time.monotonic()
    entry = DeltaCache(cache_dir).get(held, target, staged)
    tmp = f"{output}.tmp"
    shutil.copyfile(entry.path, tmp)
    os.replace(tmp, output)
    return {"stream_bytes": entry.stream_bytes, "nar_bytes": entry.nar_bytes, "cached": entry.cached,
            "seconds": round(time.monotonic() - start, 3)}
