"""`reup demo`: three simulated devices behind real sshd; install, change, revert.

Registered by cli/main.py. The demo itself lives in the lab (reup_lab, a separate distribution that the
controller's wheel does not contain), imported only when the command runs.
"""


from __future__ import annotations

import argparse
import logging
import sys


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser("demo", help="a local fleet of three simulated devices behind real sshd: install, "
                          "change, revert")
    demo.add_argument("--dir", help="work directory (default: a new temporary directory, removed at the end)")
    demo.add_argument("--keep", action="store_true", help="keep the work directory")
    demo.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from reup_lab.demo import run_demo
    except ModuleNotFoundError as exc:
        if exc.name != "reup_lab":
            raise
        print("reup: the demo needs the lab: pip install reup-lab (./lab in the source tree)", file=sys.stderr)
        return 2

    if args.log_level == "info":  # the demo prints its own live view; records only when asked for
        logging.getLogger("reup").setLevel(logging.WARNING)
    return run_demo(args.dir, keep=args.keep)

