"""`reup check`: validate reup.toml and fleet.toml and evaluate every device, without devices.

Registered by cli/main.py; for a fleet repo's CI (the template's examples run it on
every pull request). One line per problem on stdout, `WHERE: what is wrong`
(`reup.toml: ...`, `fleet.toml: ...`, `device NAME: error: ...`); exit 1 if there
is any, 0 with a one-line summary otherwise. Evaluation is the controller's own
(cli/preview.py, io/builder.py): what passes here evaluates the same way in `reup run`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from reup.cli.preview import Source, evaluate, workspace
from reup.config.reup_toml import load_config
from reup.core.errors import ConfigError, ReupError, headline
from reup.io.builder import Builder
from reup.io.nix import NixExecutor


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    check = sub.add_parser("check", help="validate reup.toml and fleet.toml and evaluate every device (no SSH)")
    check.add_argument("--config", "-c", default="reup.toml",
                       help="the controller's reup.toml (checked when it exists or --repo is not given)")
    check.add_argument("--repo", help="the fleet repo (default: source.url of --config)")
    check.add_argument("--rev", help="the revision to check (default: HEAD of --repo, or the configured branch)")
    check.set_defaults(func=cmd_check)


def problems(args: argparse.Namespace) -> tuple[list[str], int]:
    """(one line per problem, devices evaluated)."""
    out: list[str] = []
    cfg = None
    if not args.repo or os.path.exists(args.config):
        try:
            cfg = load_config(args.config)
        except ConfigError as exc:
            out.append(str(exc) if str(exc).startswith(args.config) else f"{args.config}: {exc}")
            if not args.repo:
                return out, 0
    url = os.path.abspath(args.repo) if args.repo else cfg.source.url if cfg else ""
    src = Source(url, cfg.source.fleet_file if cfg else "fleet.toml", None,
                 tuple(sorted(cfg.build.nix_options.items())) if cfg else ())
    rev = args.rev or ("HEAD" if args.repo or not cfg else cfg.source.branch)
    with workspace(src) as (revs, _):
        try:
            commit = revs.resolve(rev)
            _, targets = evaluate(revs, Builder(NixExecutor(options=dict(src.nix_options))), commit, src.fleet_file)
        except ReupError as exc:
            return [*out, str(exc)], 0
    for t in targets:
        if t.error is not None:
            out.append(f"device {t.device}: {headline(t.error)}")
    return out, len(targets)


def cmd_check(args: argparse.Namespace) -> int:
    if args.log_level == "info":  # the problems are the output; records only when asked for
        logging.getLogger("reup").setLevel(logging.ERROR)
    found, devices = problems(args)
    for line in found:
        print(line)
    if found:
        print(f"reup check: {len(found)} problem{'s' if len(found) != 1 else ''}", file=sys.stderr)
        return 1
    print(f"ok: {devices} devices evaluate")
    return 0
