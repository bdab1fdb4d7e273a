"""`reup-receive`: the device's command line, and sshd's forced command.

Output is one JSON object on stdout; errors are one line on stderr and the
exit codes of errors.py. With `--ssh-command` the verb comes from
`SSH_ORIGINAL_COMMAND` and only the receiver's own verbs are accepted, so an
`authorized_keys` entry `restrict,command="reup-receive --root DIR --ssh-command"`
gives the controller these verbs and nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shlex
import signal
import sys
from collections.abc import Sequence

from reup_receiver import confirm, faults, maintenance
from reup_receiver.device import Device, translate_oserror
from reup_receiver.errors import ReceiveError, UsageError
from reup_receiver.protocol import ACTIONS, VERBS, check_confirm_timeout
from reup_receiver.receive import receive

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reup-receive", description="Install a reup stream read on stdin.")
    p.add_argument("--root", default="/", help="device filesystem root (default /)")
    p.add_argument("--activate", choices=ACTIONS, default="switch",
                   help="switch-to-configuration action after install (default switch)")
    verbs = p.add_mutually_exclusive_group()
    verbs.add_argument("--status", action="store_true", help="print the device's state as JSON")
    verbs.add_argument("--rollback", action="store_true", help="go back to the previous generation")
    verbs.add_argument("--gc", action="store_true", help="delete paths no kept generation needs")
    verbs.add_argument("--confirm", type=int, metavar="GEN",
                       help="commit generation GEN, which awaits confirmation (after --check)")
    verbs.add_argument("--watchdog", action="store_true", help=argparse.SUPPRESS)
    verbs.add_argument("--ssh-command", action="store_true",
                       help="run the verb in SSH_ORIGINAL_COMMAND (forced-command mode)")
    p.add_argument("--keep", type=int, default=3, help="generations --gc keeps (default 3)")
    p.add_argument("--confirm-timeout", type=float, default=0, metavar="SECONDS",
                   help="after activating, roll back unless --confirm arrives within SECONDS")
    p.add_argument("--check", metavar="CMD", help="with --confirm: health check to pass first")
    return p


def _ssh_verb(args: argparse.Namespace) -> argparse.Namespace:
    """Map SSH_ORIGINAL_COMMAND onto the same options; refuse anything else."""
    original = os.environ.get("SSH_ORIGINAL_COMMAND", "")
    try:
        words = shlex.split(original)
    except ValueError as exc:
        raise UsageError(f"refused: cannot parse command {original!r}") from exc
    if words and os.path.basename(words[0]) == "reup-receive":
        words = words[1:]
    verb = argparse.ArgumentParser(prog="reup-receive (ssh)", add_help=False, exit_on_error=False)
    verb.add_argument("verb", choices=VERBS)
    verb.add_argument("generation", type=int, nargs="?")
    verb.add_argument("--activate", choices=ACTIONS, default=args.activate)
    verb.add_argument("--keep", type=int, default=args.keep)
    verb.add_argument("--confirm-timeout", type=float, default=args.confirm_timeout)
    verb.add_argument("--check")
    try:
        parsed, extra = verb.parse_known_args(words)
    except (argparse.ArgumentError, SystemExit) as exc:
        raise UsageError(f"refused: {original!r} is not a reup-receive verb") from exc
    if extra or (parsed.verb == "confirm") != (parsed.generation is not None):
        raise UsageError(f"refused: {original!r} is not a reup-receive verb")
    args.status = parsed.verb == "status"
    args.rollback = parsed.verb == "rollback"
    args.gc = parsed.verb == "gc"
    args.confirm = parsed.generation
    args.activate = parsed.activate
    args.keep = parsed.keep
    args.confirm_timeout = parsed.confirm_timeout
    args.check = parsed.check
    return args


def _check_args(args: argparse.Namespace) -> None:
    """Bounded verb arguments (invariant 8): usage errors, before anything is touched."""
    check_confirm_timeout(args.confirm_timeout)
    if not 1 <= args.keep <= 10_000:
        raise UsageError(f"--keep {args.keep}: must be between 1 and 10000")
    if args.confirm is not None and args.confirm < 1:
        raise UsageError(f"confirm {args.confirm}: not a generation number")


def run(args: argparse.Namespace) -> dict[str, object]:
    if args.ssh_command:
        args = _ssh_verb(args)
    _check_args(args)
    device = Device(args.root)
    if args.watchdog:
        return confirm.watchdog(device)
    confirm.expire_if_overdue(device)  # the device may have been down past a deadline
    if args.status:
        return maintenance.status(device)
    if args.confirm is not None:
        return confirm.confirm(device, args.confirm, args.check)
    if args.rollback:
        return maintenance.rollback(device, args.activate)
    if args.gc:
        return maintenance.gc(device, args.keep)
    return receive(device, sys.stdin.buffer, args.activate, args.confirm_timeout).to_json()


def _return_freed_memory() -> None:
    """Keep glibc from raising its mmap threshold after large frees.

    Patches hold whole files in memory one after another; with the dynamic
    threshold, freed buffers stay in the heap and the peak grows with each.
    A fixed threshold returns every large buffer to the system at once.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 128 << 10)


def main(argv: Sequence[str] | None = None) -> int:
    _return_freed_memory()
    # sshd's hangup when the session drops (activation restarts the network) must not kill a
    # receive halfway; a closed stdout is an EPIPE on the answer, handled below (invariant 1).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    faults.install()
    args = build_parser().parse_args(argv)
    try:
        try:
            result = run(args)
        except OSError as exc:
            raise translate_oserror(exc, "receiving") from exc
    except ReceiveError as exc:
        print(f"reup-receive: {exc.kind}: {exc}", file=sys.stderr)
        return exc.exit_code
    except ValueError as exc:
        print(f"reup-receive: usage: {exc}", file=sys.stderr)
        return UsageError.exit_code
    try:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
        sys.stdout.flush()
    except BrokenPipeError:  # the controller went away; the work is done and recorded
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
