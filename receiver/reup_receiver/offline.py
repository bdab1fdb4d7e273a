"""Updates carried on a USB stick: `reup-receive --from-file PATH` applies a signed bundle and writes
a signed receipt back next to it.

A bundle (written by `reup export`, reup.io.offline) is, under `PATH/reup/<device>/`:
`bundle-<seq>.stream` (a reup stream), `bundle-<seq>.json` (the envelope: device, sequence,
toplevel, the stream's size and sha256, activation, confirm timeout, health check) and
`bundle-<seq>.json.sig` (an SSHSIG by the controller's key over the envelope, namespace
`reup-bundle`). The device applies the newest bundle for its own name only if: the signature
verifies against its allowed-signers file (principal `reup-controller`); the envelope names this
device; its sequence is newer than the last bundle applied (no replays); and the stream's size and
sha256 match the envelope (a truncated or altered file). Then the usual receive (every path
verified, the trailer digest), activation with the confirmation deadline armed, the health check
and a local confirm (or the rollback). Whatever happened, `receipt-<seq>.json` (+ `.sig`, by the
device's SSH host key, namespace `reup-receipt`) says so: device, sequence, generation, toplevel,
outcome. `reup import` reads the receipts. Called by cli.py.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import time
from typing import Any

from reup_receiver import confirm, sshsig
from reup_receiver.device import Device, write_atomic
from reup_receiver.errors import BadSignature, Corrupt, HealthCheckFailed, ReceiveError, Truncated
from reup_receiver.protocol import ACTIONS
from reup_receiver.receive import receive

MAX_ENVELOPE = 64 << 10
_SEQ = re.compile(r"bundle-(\d{1,20})\.json$")


def bundle_dir(stick: str, device_name: str) -> str:
    return os.path.join(stick, "reup", device_name)


def _state_file(device: Device) -> str:
    return os.path.join(device.state, "offline.json")


def last_sequence(device: Device) -> int:
    try:
        with open(_state_file(device), encoding="utf-8") as f:
            return int(json.load(f)["sequence"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def newest_envelope(path: str, device_name: str) -> str:
    """The envelope to apply: `path` itself, or the newest bundle for this device on the stick."""
    if os.path.isfile(path):
        return path
    found = [(int(m.group(1)), p) for p in glob.glob(os.path.join(bundle_dir(path, device_name), "bundle-*.json"))
             if (m := _SEQ.search(p))]
    if not found:
        raise BadSignature(f"no bundle for {device_name} under {path}")
    return max(found)[1]


def read_envelope(path: str, allowed_signers: str, device_name: str, device: Device) -> dict[str, Any]:
    """The envelope, once its signature, device, and sequence check out."""
    with open(path, "rb") as f:
        raw = f.read(MAX_ENVELOPE + 1)
    try:
        with open(path + ".sig", "rb") as f:
            sig = f.read(MAX_ENVELOPE)
    except FileNotFoundError as exc:
        raise BadSignature(f"{path}: no signature next to it") from exc
    if len(raw) > MAX_ENVELOPE:
        raise BadSignature(f"{path}: envelope too large")
    try:
        sshsig.verify(allowed_signers, sshsig.CONTROLLER_IDENTITY, raw, sig, sshsig.BUNDLE_NAMESPACE)
    except sshsig.SignatureError as exc:
        raise BadSignature(f"{path}: {exc}") from exc
    try:
        env = json.loads(raw)
        fields = (env["device"], env["sequence"], env["toplevel"], env["stream"], env["stream_bytes"],
                  env["stream_sha256"])
    except (ValueError, KeyError, TypeError) as exc:
        raise BadSignature(f"{path}: malformed envelope") from exc
    if not all(isinstance(x, str) for x in (fields[0], fields[2], fields[3], fields[5])) \
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in (fields[1], fields[4])) \
            or os.path.basename(fields[3]) != fields[3] or env.get("activate", "switch") not in ACTIONS:
        raise BadSignature(f"{path}: malformed envelope")
    if env["device"] != device_name:
        raise BadSignature(f"bundle is for device {env['device']!r}, this is {device_name!r}")
    if env["sequence"] <= last_sequence(device):
        raise BadSignature(f"bundle {env['sequence']} is not newer than the last one applied "
                           f"({last_sequence(device)}): a replay")
    return dict(env)


def _check_stream(path: str, env: dict[str, Any]) -> None:
    size = os.path.getsize(path)
    if size < env["stream_bytes"]:
        raise Truncated(f"{path}: {size} bytes, the signed envelope says {env['stream_bytes']}")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    if size != env["stream_bytes"] or h.hexdigest() != env["stream_sha256"]:
        raise Corrupt(f"{path}: does not match the digest in its signed envelope")


def apply(device: Device, path: str, *, device_name: str, allowed_signers: str,
          host_key: str | None) -> dict[str, Any]:
    """Apply the bundle at `path` (a stick or an envelope); write a receipt whatever happens."""
    envelope = newest_envelope(path, device_name)
    env: dict[str, Any] = {}
    receipt: dict[str, Any] = {"reup_receipt": 1, "device": device_name, "envelope": os.path.basename(envelope)}
    try:
        env = read_envelope(envelope, allowed_signers, device_name, device)
        receipt.update(sequence=env["sequence"], commit=env.get("commit"), toplevel=env["toplevel"])
        stream = os.path.join(os.path.dirname(envelope), env["stream"])
        _check_stream(stream, env)
        timeout = float(env.get("confirm_timeout") or 0)
        with open(stream, "rb") as f:
            answer = receive(device, f, env.get("activate", "switch"), timeout)
        _remember(device, env["sequence"])  # applied: the same bundle is never applied again
        receipt.update(generation=answer.generation, toplevel=answer.toplevel)
        if answer.confirm_deadline is not None and answer.generation is not None:
            confirm.confirm(device, answer.generation, env.get("health_check"))
        receipt.update(outcome="committed")
    except HealthCheckFailed as exc:
        receipt.update(outcome="rolled_back", error=str(exc))
        raise
    except BadSignature as exc:
        receipt.update(outcome="refused", error=str(exc))
        raise
    except (ReceiveError, OSError) as exc:
        receipt.update(outcome="failed", error=str(exc))
        raise
    finally:
        receipt["at"] = time.time()
        _write_receipt(envelope, receipt, host_key)
    return receipt


def _remember(device: Device, sequence: int) -> None:
    os.makedirs(device.state, exist_ok=True)
    write_atomic(_state_file(device), json.dumps({"sequence": sequence, "at": time.time()}).encode())


def _write_receipt(envelope: str, receipt: dict[str, Any], host_key: str | None) -> None:
    """receipt-<seq>.json next to the envelope, signed by the host key when the device has one."""
    m = _SEQ.search(envelope)
    seq = m.group(1) if m else "0"
    # A refusal (a replay, a wrong key) never overwrites the receipt of the bundle it imitates.
    name = f"receipt-{seq}.json" if receipt.get("outcome") != "refused" else f"receipt-{seq}-refused-{time.time_ns()}.json"
    path = os.path.join(os.path.dirname(envelope), name)
    data = json.dumps(receipt, sort_keys=True).encode()
    write_atomic(path, data)
    if host_key:
        # Unsigned if the key cannot sign: `reup import` refuses it, the stick still says what happened.
        with contextlib.suppress(sshsig.SignatureError):
            write_atomic(path + ".sig", sshsig.sign(host_key, data, sshsig.RECEIPT_NAMESPACE))
