"""The controller's side of updates carried on a USB stick: signed bundles out, signed receipts in.

Called by `reup export` and `reup import` (cli/offline.py). The layout and the device's checks are
reup_receiver.offline's (normative text: docs/controller.md, "Updates on a USB stick"); signatures
are OpenSSH's SSHSIG (reup_receiver.sshsig): bundles are signed with the controller's SSH key,
receipts verified against the device's host key pinned in fleet.toml, so a receipt can only say
what happened on the device it names.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from reup_receiver import sshsig
from reup_receiver.offline import bundle_dir

_RECEIPT = re.compile(r"receipt-(\d{1,20})(-refused-\d{1,20})?\.json$")


@dataclass(frozen=True)
class Bundle:
    device: str
    sequence: int
    envelope: str
    stream_bytes: int


def write_bundle(out: str, device: str, stream: str, *, key: str, sequence: int, toplevel: str, commit: str | None,
                 base: str | None, activate: str, confirm_timeout: float, health_check: str | None) -> Bundle:
    """Copy `stream` for `device` onto the stick at `out` with its signed envelope."""
    d = bundle_dir(out, device)
    os.makedirs(d, exist_ok=True)
    name = f"bundle-{sequence}"
    tmp = os.path.join(d, name + ".stream.tmp")
    shutil.copyfile(stream, tmp)
    h = hashlib.sha256()
    with open(tmp, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    size = os.path.getsize(tmp)
    os.replace(tmp, os.path.join(d, name + ".stream"))
    envelope = {"reup_bundle": 1, "device": device, "sequence": sequence, "toplevel": toplevel, "commit": commit,
                "base": base, "stream": name + ".stream", "stream_bytes": size, "stream_sha256": h.hexdigest(),
                "activate": activate, "confirm_timeout": confirm_timeout, "health_check": health_check}
    data = json.dumps(envelope, sort_keys=True, indent=1).encode()
    signature = sshsig.sign(key, data, sshsig.BUNDLE_NAMESPACE)
    path = os.path.join(d, name + ".json")
    with open(path + ".sig", "wb") as f:
        f.write(signature)
    with open(path, "wb") as f:  # last: a bundle without its envelope is never applied
        f.write(data)
    return Bundle(device, sequence, path, size)


@dataclass(frozen=True)
class Receipt:
    device: str
    sequence: int | None
    outcome: str  # committed, rolled_back, failed, refused; "invalid" when it does not verify
    commit: str | None = None
    toplevel: str | None = None
    generation: int | None = None
    error: str | None = None
    path: str = ""


def read_receipts(stick: str, host_keys: Mapping[str, str]) -> list[Receipt]:
    """Every receipt on the stick for a device in `host_keys`, checked against that device's host key."""
    out = []
    for device, host_key in sorted(host_keys.items()):
        for path in sorted(glob.glob(os.path.join(bundle_dir(stick, device), "receipt-*.json"))):
            if _RECEIPT.search(path):
                out.append(_read(path, device, host_key))
    return out


def _read(path: str, device: str, host_key: str) -> Receipt:
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
        with open(path + ".sig", "rb") as f:
            signature = f.read(1 << 16)
        sshsig.verify_with_key(host_key, device, data, signature, sshsig.RECEIPT_NAMESPACE)
        r: dict[str, Any] = json.loads(data)
    except (OSError, ValueError, sshsig.SignatureError) as exc:
        return Receipt(device, None, "invalid", error=f"{path}: {exc}", path=path)
    if r.get("device") != device:
        return Receipt(device, None, "invalid", error=f"{path}: names device {r.get('device')!r}", path=path)
    gen = r.get("generation")
    seq = r.get("sequence")
    return Receipt(device, seq if isinstance(seq, int) else None, str(r.get("outcome")),
                   r.get("commit") if isinstance(r.get("commit"), str) else None,
                   r.get("toplevel") if isinstance(r.get("toplevel"), str) else None,
                   gen if isinstance(gen, int) and not isinstance(gen, bool) else None,
                   r.get("error") if isinstance(r.get("error"), str) else None, path)
