"""`reup init DIR [--offline]`: start a fleet repo from the template.

Registered by cli/main.py; the copying is io/template.py.
"""


from __future__ import annotations

import argparse

from reup.core.errors import ConfigError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    init = sub.add_parser("init", help="start a fleet repo from the template (NixOS flake, fleet.toml, modules)",
                          description="Copy the fleet-repo template into DIR and commit it (with your git identity "
                                      "when you have one).")
    init.add_argument("dir", metavar="DIR", help="a new or empty directory")
    init.add_argument("--offline", action="store_true",
                      help="the offline flavor: the same fleet from input-free derivations (no nixpkgs needed)")
    init.set_defaults(func=cmd_init)


def cmd_init(args: argparse.Namespace) -> int:
    from reup.io.nix import NixError
    from reup.io.template import init_fleet_repo

    try:
        commit = init_fleet_repo(args.dir, offline=args.offline)
    except NixError as exc:
        raise ConfigError(str(exc)) from exc
    steps = ["set each device's host and host_key in fleet.toml (`ssh-keyscan -t ed25519 HOST`)"]
    if not args.offline:
        steps += ["point flake.nix's inputs.reup.url at your copy of reup, then `nix flake lock` and commit "
                  "flake.lock", "put the controller's public key in hosts/common.nix"]
    steps += ["commit, run `reup check` in the repo's CI, and point reup.toml's [source] url at it"]
    print(f"{args.dir}: fleet repo at {commit[:12]}. Next:")
    print("\n".join(f"  {i}. {s}" for i, s in enumerate(steps, 1)))
    return 0


