"""`reup init DIR [--offline]`: start a fleet repo from the template.

Registered by cli/main.py; the copying is io/template.py.
"""


from __future__ import annotations

import argparse
import sys

from reup.core.errors import ConfigError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    init = sub.add_parser("init", help="start a fleet repo from the template (NixOS flake, fleet.toml, modules)")
    init.add_argument("dir", help="new or empty directory")
    init.add_argument("--offline", action="store_true",
                      help="the offline flavor: the same fleet from input-free derivations (no nixpkgs needed)")
    init.set_defaults(func=cmd_init)


def cmd_init(args: argparse.Namespace) -> int:
    from reup.io.nix import NixError
    from reup.io.template import init_fleet_repo

    try:
        commit = init_fleet_repo(args.dir, offline=args.offline)
    except (ConfigError, NixError) as exc:
        print(f"reup: {exc}", file=sys.stderr)
        return 2
    print(f"{args.dir}: fleet repo at {commit[:12]}. Next: set each device's host and host_key in fleet.toml"
          + ("" if args.offline else ", the controller's key in hosts/common.nix")
          + ", commit, and point reup.toml's [source] url at it.")
    return 0


