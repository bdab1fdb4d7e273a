"""Many simulated devices in one process: an asyncssh server on 127.0.0.1 whose SSH user names the device.

Used by the fleet-scale benchmark (bench/fleet.py, `make bench-fleet`) and its reduced test, so that
one controller can be measured against thousands of devices without thousands of sshd processes.
Every device speaks the real forced-command protocol (`reup_receiver.protocol`):

- `status`: current generation, generations, held store paths, pending confirmation, last rollback;
- `receive --activate A [--confirm-timeout T]`: reads the whole stream with the receiver's own
  format modules (`RecordReader`, `decode_manifest`), refuses a stream whose known paths the device
  does not hold (`missing-base`), walks every record and checks the trailer digest (`corrupt`
  otherwise); then the device holds every path of the manifest and runs the new generation, pending
  for T seconds if asked (the deadline starts when the stream is complete, as on a real device);
- `confirm N`: confirms a pending generation (`not-pending` otherwise);
- at the deadline an unconfirmed generation rolls back to the previous one (`last_rollback`).

Paths are not unpacked (the receiver's own cost is measured by `make bench`): only the controller
is measured. Each acknowledgement, rollback and refusal is appended to an event log, one JSON line
each, so the benchmark can time the first and last acknowledgement. Run as
`python -m reup_lab.fakefleet --port P --host-key K --client-key K.pub --events FILE`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import shlex
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

import asyncssh
from reup_receiver.errors import ReceiveError
from reup_receiver.format.manifest import decode_manifest
from reup_receiver.format.wire import T_MANIFEST, T_TRAILER, VERSION, RecordReader
from reup_receiver.patches import available_codecs
from reup_receiver.protocol import ExitCode, ReceiveAnswer

STORE = "/nix/store"
MAX_STREAM = 512 << 20


@dataclass
class FakeDevice:
    name: str
    paths: set[str] = field(default_factory=set)
    generations: list[tuple[int, str]] = field(default_factory=list)
    current: int | None = None  # generation number
    pending: dict[str, Any] | None = None
    last_rollback: dict[str, Any] | None = None
    timer: asyncio.TimerHandle | None = None

    def current_toplevel(self) -> str | None:
        return dict(self.generations).get(self.current) if self.current is not None else None

    def status(self) -> dict[str, object]:
        pending = None
        if self.pending is not None:
            pending = {"generation": self.pending["generation"], "deadline": self.pending["deadline"],
                       "remaining": max(0.0, self.pending["deadline"] - time.time())}
        return {"current": self.current_toplevel(), "generation": self.current,
                "generations": [{"number": n, "toplevel": t} for n, t in self.generations],
                "paths": sorted(self.paths), "staged": [], "pending": pending,
                "last_rollback": self.last_rollback, "format": VERSION,
                "codecs": [c.name.lower() for c in available_codecs()]}


class Fleet:
    def __init__(self, events: TextIO) -> None:
        self.devices: dict[str, FakeDevice] = {}
        self.events = events
        self.counts: dict[str, int] = {}

    def device(self, name: str) -> FakeDevice:
        dev = self.devices.get(name)
        if dev is None:
            dev = self.devices[name] = FakeDevice(name)
        return dev

    def log(self, kind: str, device: str, **extra: object) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.events.write(json.dumps({"at": time.time(), "kind": kind, "device": device, **extra}) + "\n")
        self.events.flush()

    def receive(self, dev: FakeDevice, stream: bytes, confirm_timeout: float) -> tuple[int, str]:
        """(exit code, stdout or stderr text) of `receive` on `stream`."""
        try:
            reader = RecordReader(io.BytesIO(stream))
            tag, payload = reader.next()
            if tag != T_MANIFEST:
                return ExitCode.CORRUPT, "reup-receive: corrupt: stream does not start with a manifest"
            m = decode_manifest(payload)
            reader.limit = m.stream_bytes
            for name in m.known:
                path = f"{STORE}/{os.fsdecode(name)}"
                if path not in dev.paths:
                    return ExitCode.MISSING_BASE, f"reup-receive: missing-base: base path missing: {path}"
            while True:
                tag, payload = reader.next()
                if tag == T_TRAILER:
                    reader.check_trailer(payload)
                    break
        except ReceiveError as exc:
            return exc.exit_code, f"reup-receive: {exc.kind}: {exc}"
        dev.paths.update(f"{STORE}/{os.fsdecode(n)}" for n in m.table)
        toplevel = m.store_path(m.toplevel)
        if dev.current_toplevel() == toplevel:
            answer = ReceiveAnswer(dev.current, toplevel, bytes_read=reader.bytes_read, unchanged=True)
            return 0, json.dumps(answer.to_json())
        number = max((n for n, _ in dev.generations), default=0) + 1
        previous = dev.current
        dev.generations.append((number, toplevel))
        dev.current = number
        deadline = None
        if confirm_timeout > 0:
            deadline = time.time() + confirm_timeout
            dev.pending = {"generation": number, "deadline": deadline, "previous": previous}
            dev.timer = asyncio.get_running_loop().call_later(confirm_timeout, self._deadline, dev, number)
        else:
            self.log("ack", dev.name, generation=number)
        answer = ReceiveAnswer(number, toplevel, tuple(m.store_path(i) for i, p in enumerate(m.paths) if p.carried),
                               reader.bytes_read, confirm_deadline=deadline,
                               confirm_remaining=confirm_timeout if deadline else None)
        return 0, json.dumps(answer.to_json())

    def _deadline(self, dev: FakeDevice, number: int) -> None:
        if dev.pending is None or dev.pending["generation"] != number:
            return
        dev.current = dev.pending["previous"]
        dev.pending, dev.timer = None, None
        dev.last_rollback = {"generation": number, "reason": "confirmation deadline passed", "at": time.time()}
        self.log("rollback", dev.name, generation=number)

    def confirm(self, dev: FakeDevice, number: int) -> tuple[int, str]:
        if dev.pending is None or dev.pending["generation"] != number:
            return ExitCode.NOT_PENDING, f"reup-receive: not-pending: generation {number} is not pending"
        if dev.timer is not None:
            dev.timer.cancel()
        dev.pending, dev.timer = None, None
        self.log("ack", dev.name, generation=number)
        return 0, json.dumps({"confirmed": number})

    async def session(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        name = str(process.get_extra_info("username"))
        dev = self.device(name)
        argv = shlex.split(process.command or "")
        code: int = ExitCode.USAGE
        text = "reup-receive: usage: unknown verb"
        try:
            if argv == ["status"]:
                code, text = 0, json.dumps(dev.status())
            elif argv[:1] == ["receive"]:
                timeout = float(argv[argv.index("--confirm-timeout") + 1]) if "--confirm-timeout" in argv else 0.0
                chunks, size = [], 0
                while chunk := await process.stdin.read(1 << 20):
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > MAX_STREAM:
                        code, text = ExitCode.OVERSIZED, "reup-receive: oversized: stream too large"
                        break
                else:
                    code, text = self.receive(dev, b"".join(chunks), timeout)
                    if code:
                        self.log("refused", name, code=int(code), error=text)
            elif argv[:1] == ["confirm"] and len(argv) >= 2:
                code, text = self.confirm(dev, int(argv[1]))
        except (ValueError, IndexError) as exc:
            code, text = ExitCode.USAGE, f"reup-receive: usage: {exc}"
        except (asyncssh.Error, OSError):  # the controller went away mid-stream
            process.exit(255)
            return
        out = process.stdout if code == 0 else process.stderr
        out.write((text + "\n").encode())
        process.exit(int(code))


class _Server(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return True  # public key auth against the one authorized key, for every device name


async def serve(port: int, host_key: str, client_key: str, events: str, ready: str | None) -> None:
    with open(events, "a", encoding="utf-8") as log:
        fleet = Fleet(log)
        server = await asyncssh.create_server(
            _Server, "127.0.0.1", port, server_host_keys=[host_key],
            authorized_client_keys=client_key, process_factory=fleet.session, encoding=None,
            allow_scp=False, agent_forwarding=False, x11_forwarding=False, line_editor=False,
        )
        if ready:
            with open(ready, "w", encoding="utf-8") as f:
                f.write(str(os.getpid()))
        async with server:
            await server.wait_closed()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="reup-fakefleet", description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host-key", required=True, help="the private host key (fleet.toml gives its public half)")
    p.add_argument("--client-key", required=True, help="the controller's public key (authorized for every device)")
    p.add_argument("--events", required=True, help="append acknowledgements and rollbacks here (JSON lines)")
    p.add_argument("--ready", help="write the PID here once listening")
    args = p.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port, args.host_key, args.client_key, args.events, args.ready))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
