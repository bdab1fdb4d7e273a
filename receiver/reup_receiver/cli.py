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
import socket
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import BinaryIO, cast

from reup_receiver import confirm, faults, maintenance, offline, resume
from reup_receiver.boot import counted
from reup_receiver.device import Device, translate_oserror
from reup_receiver.errors import ReceiveError, UsageError
from reup_receiver.format.wire import VERSION
from reup_receiver.protocol import ACTIONS, VERBS, check_confirm_timeout
from reup_receiver.receive import receive

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reup-receive", description="reup's device side: install a reup stream read "
                                "on stdin, verified and failure-atomically, or run one of the verbs below.")
    p.add_argument("--version", action="version", version=f"reup-receive {_version()} (stream format {VERSION})")
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
    verbs.add_argument("--from-file", metavar="PATH",
                       help="apply the signed bundle on a stick (PATH: its mount point, or an envelope)")
    verbs.add_argument("--ssh-command", action="store_true",
                       help="run the verb in SSH_ORIGINAL_COMMAND (forced-command mode)")
    p.add_argument("--keep", type=int, default=3, help="generations --gc keeps (default 3)")
    p.add_argument("--confirm-timeout", type=float, default=0, metavar="SECONDS",
                   help="after activating, roll back unless --confirm arrives within SECONDS")
    p.add_argument("--check", metavar="CMD", help="with --confirm: health check to pass first")
    _resume_options(p)
    p.add_argument("--device", default=socket.gethostname(), help="with --from-file: this device's name "
                   "(default: the host name)")
    p.add_argument("--allowed-signers", default="/etc/reup/allowed_signers",
                   help="with --from-file: keys that may sign bundles (principal reup-controller)")
    p.add_argument("--host-key", default="/etc/ssh/ssh_host_ed25519_key",
                   help="with --from-file: the key that signs receipts (default: the SSH host key)")
    return p


def _version() -> str:
    try:
        return version("reup-receiver")
    except PackageNotFoundError:
        return "unknown"
def _resume_options(p: argparse.ArgumentParser) -> None:
    """Byte-level resume (resume.py): spool the stream, or continue a kept partial."""
    p.add_argument("--stream-id", metavar="HEX", help="keep the stream's bytes so an interrupted receive can resume")
    p.add_argument("--resume-from", type=int, default=0, metavar="N", help="continue the kept partial at byte N")
    p.add_argument("--resume-sha256", metavar="HEX", help="sha256 of the stream's first N bytes")


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
    _resume_options(verb)
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
    args.stream_id, args.resume_from, args.resume_sha256 = parsed.stream_id, parsed.resume_from, parsed.resume_sha256
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
        args.from_file = None  # never over SSH
    _check_args(args)
    device = Device(args.root)
    if args.watchdog:
        return confirm.watchdog(device)
    # Not for the watchdog (above): its parent holds the device lock until the watchdog says it runs.
    confirm.settle_boot(device)  # a generation on trial whose kernel did not come up
    confirm.expire_if_overdue(device)  # the device may have been down past a deadline
    if args.status:
        return maintenance.status(device)
    if args.confirm is not None:
        return confirm.confirm(device, args.confirm, args.check)
    if args.rollback:
        return maintenance.rollback(device, args.activate)
    if args.gc:
        return maintenance.gc(device, args.keep)
    if args.from_file:
        return offline.apply(device, args.from_file, device_name=args.device, allowed_signers=args.allowed_signers,
                             host_key=args.host_key if os.path.exists(args.host_key) else None)
    if args.stream_id:
        answer = _receive_resumable(device, args)
    else:
        answer = receive(device, sys.stdin.buffer, args.activate, args.confirm_timeout).to_json()
    if args.activate == "reboot" and counted.judge(device)[0] == "not_rebooted":
        counted.reboot(device)  # detached and delayed: the answer goes out first
    return answer


def _receive_resumable(device: Device, args: argparse.Namespace) -> dict[str, object]:
    spool = resume.SpoolInput(device, sys.stdin.buffer, args.stream_id, args.resume_from, args.resume_sha256,
                              progress=sys.stdout.buffer)
    error: BaseException | None = None
    try:
        return receive(device, cast(BinaryIO, spool), args.activate, args.confirm_timeout).to_json()
    except BaseException as exc:
        error = exc
        raise
    finally:
        resume.finish(device, spool, error)


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
