"""`reup source test`: fetch the fleet repo once, as the controller would, and say how it went.

Reports the transport, the git server's host key fingerprint (ssh), how we authenticated and the
head commit, so a deploy key, a pinned known_hosts, a token or a CA file can be checked before
`reup run`. Fetches into a temporary mirror: the controller's state is not touched. Registered by
cli/main.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from typing import Any

import pygit2

from reup.config.reup_toml import load_config
from reup.core.errors import ConfigError, ReupError
from reup.io.gitfetch import SourceRefused, credentials_from
from reup.io.source import GitSource


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    source = sub.add_parser("source", help="check the fleet repo source")
    actions = source.add_subparsers(dest="action", required=True, metavar="ACTION", help="test: fetch once")
    test = actions.add_parser("test", help="fetch once; report host key, auth method and head commit")
    test.add_argument("--config", "-c", default="reup.toml", help="reup.toml (default ./reup.toml)")
    test.add_argument("--json", action="store_true", help="one JSON object instead of text")
    test.set_defaults(func=cmd_source_test)


def source_test(config_path: str) -> dict[str, Any]:
    cfg = load_config(config_path)
    tmp = tempfile.mkdtemp(prefix="reup-source-test-")
    src = GitSource(cfg.source.url, cfg.source.branch, tmp, credentials_from(cfg.source))
    out: dict[str, Any] = {"url": cfg.source.url, "branch": cfg.source.branch}
    try:
        head = src.fetch()
        report = src.last_report
        commit = pygit2.Repository(tmp).get(head)
        subject = commit.message.splitlines()[0] if isinstance(commit, pygit2.Commit) and commit.message else ""
        out.update(result="success", head=head, subject=subject,
                   transport=report.transport if report else "local",
                   auth=report.auth if report else "none",
                   host_key=report.host_key if report else None,
                   host_key_check=("skipped (insecure)" if cfg.source.insecure_skip_host_key_check
                                   else "pinned known_hosts") if report and report.transport == "ssh" else None)
    except SourceRefused as exc:
        out.update(result=exc.result, error=str(exc))
    except ReupError as exc:
        out.update(result="error", error=str(exc))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def cmd_source_test(args: argparse.Namespace) -> int:
    try:
        out = source_test(args.config)
    except ConfigError as exc:
        print(f"reup: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"source     {out['url']} (branch {out['branch']})")
        if out["result"] == "success":
            print(f"transport  {out['transport']}")
            if out.get("host_key"):
                print(f"host key   {out['host_key']} ({out['host_key_check']})")
            print(f"auth       {out['auth']}")
            print(f"head       {out['head']} {out['subject']}")
        else:
            print(f"refused    {out['result']}" if out["result"] != "error" else "failed     (temporary)")
            print(f"error      {out['error']}")
    return 0 if out["result"] == "success" else 1
