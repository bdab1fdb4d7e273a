# PYTHON_ARGCOMPLETE_OK
"""The `reup` command line: one subcommand per module of reup.cli, dispatched here.

Each command module exposes `register(subparsers)`, adding its subcommands and setting `func`;
`main` sets up logging and runs the command through cli/common.py's error mapping. Called by the
`reup` console script.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from reup.cli.common import run_command, setup_logging

DESCRIPTION = ("reup: GitOps delivery of NixOS systems to device fleets by binary delta. It watches a fleet "
               "repo, builds each device's system with Nix, sends every device only the difference from what "
               "it last acknowledged, over SSH, and rolls out in waves with health checks and self-rollback.")
EPILOG = ("Start with `reup init DIR` (a fleet repo), `reup check` in its CI, `reup run` on the controller; "
          "`reup demo` shows it all on simulated devices. Docs: README.md, docs/controller.md.")

# Modules that contribute subcommands; each has register(subparsers).
_COMMAND_MODULES = (
    "reup.cli.run",
    "reup.cli.status",
    "reup.cli.plan",
    "reup.cli.check",
    "reup.cli.rollout",
    "reup.cli.init",
    "reup.cli.demo",
    "reup.cli.delta",
    "reup.cli.source",
    "reup.cli.offline",
)


def _version() -> str:
    try:
        return version("reup")
    except PackageNotFoundError:  # running from a source tree without an install
        return "unknown"


def _add_output_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # On the top parser with defaults; on each subcommand too (SUPPRESS keeps the top's value), so both
    # `reup --log-level debug run` and `reup run --log-level debug` work.
    d = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
    group = parser.add_argument_group("output")
    group.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default=d("info"),
                       help="least severe log records shown on stderr (default info)")
    group.add_argument("--log-format", choices=("text", "json"), default=d("text"),
                       help="log records as text lines or as one JSON object per line (default text)")
    group.add_argument("--debug", action="store_true", default=d(False),
                       help="show Python tracebacks for errors (default: one line per error)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reup", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"reup {_version()}")
    _add_output_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    for subparser in sub.choices.values():
        _add_output_options(subparser, top=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        import argcomplete

        argcomplete.autocomplete(parser)
    except ImportError:  # completion is optional
        pass
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    return run_command(lambda: int(args.func(args)), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
