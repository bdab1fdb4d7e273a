"""The device end: a real sshd with `restrict,command="reup-receive --root DIR --ssh-command"`
runs the receiver's verbs for the controller's key and refuses anything else."""

from __future__ import annotations

import asyncio
import getpass
import json
import os

import asyncssh
import pytest
from reup.core.errors import PermanentError
from reup.core.model import Device
from reup.io.ssh import SshPusher
from support.sshd import SimDevice, generate_key

pytestmark = pytest.mark.slow


async def _run_all(dev: SimDevice, key: str, commands: list[str]) -> list[tuple[int | None, str, str]]:
    trusted = [asyncssh.import_public_key(dev.host_key)]
    out = []
    async with asyncssh.connect("127.0.0.1", dev.port, username=getpass.getuser(),
                                client_keys=[key], known_hosts=(trusted, [], []), agent_path=None,
                                config=[]) as conn:
        for cmd in commands:
            res = await conn.run(cmd, check=False, timeout=30)
            out.append((res.exit_status, str(res.stdout), str(res.stderr)))
        # `restrict` also forbids port forwarding.
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.open_connection("127.0.0.1", dev.port)
    return out


def test_forced_command_refuses_all_but_receiver_verbs(tmp_path: os.PathLike[str]) -> None:
    key = os.path.join(tmp_path, "id_ed25519")
    dev = SimDevice("dev", os.path.join(tmp_path, "dev"), generate_key(key))
    dev.prepare()
    dev.start()
    try:
        marker = os.path.join(tmp_path, "pwned")
        refused_cmds = ["id", f"touch {marker}", f"status; touch {marker}", f"status && touch {marker}",
                        "sh -c id", "status --root /", "gc --keep 1 --extra", "reup-receive --status", ""]
        results = asyncio.run(_run_all(dev, key, ["status", *refused_cmds, "rollback"]))
        code, stdout, _ = results[0]
        assert code == 0 and json.loads(stdout)["current"] is None
        for cmd, (code, _, stderr) in zip(refused_cmds, results[1:-1], strict=True):
            assert code == 2 and "refused" in stderr, (cmd, code, stderr)
        assert not os.path.exists(marker)
        code, _, stderr = results[-1]
        assert code == 23  # a real verb: rollback with no earlier generation
    finally:
        dev.stop()


def test_wrong_host_key_is_refused(tmp_path: os.PathLike[str]) -> None:
    key = os.path.join(tmp_path, "id_ed25519")
    dev = SimDevice("dev", os.path.join(tmp_path, "dev"), generate_key(key))
    dev.prepare()
    dev.start()
    try:
        other = generate_key(os.path.join(tmp_path, "other_host_key"))
        pusher = SshPusher(None, key=key, connect_timeout=5, attempts=1)  # type: ignore[arg-type]
        good = Device("dev", "127.0.0.1", dev.host_key, port=dev.port, user=getpass.getuser())
        assert asyncio.run(pusher.status(good)).current is None
        bad = Device("dev", "127.0.0.1", other, port=dev.port, user=good.user)
        with pytest.raises(PermanentError, match="host key"):
            asyncio.run(pusher.status(bad))
    finally:
        dev.stop()
