"""The `reup` command line: one subcommand per module.

Each feature module exposes `register(subparsers)` adding its subcommands and
setting `func` on the parser; `main` only dispatches. Called by the `reup`
console script.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules that contribute subcommands; each has register(subparsers).
_COMMAND_MODULES = (
    "reup.cli.run",
    "reup.cli.status",
    "reup.cli.plan",
    "reup.cli.rollout",
    "reup.cli.init",
    "reup.cli.demo",
    "reup.cli.delta",
    "reup.cli.offline",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reup", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
