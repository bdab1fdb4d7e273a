"""Ed25519 (or any OpenSSH key) signatures with OpenSSH's own `ssh-keygen -Y sign/verify` (SSHSIG).

Why OpenSSH and not a Python library: every device already runs sshd, so `ssh-keygen` is there and
the keys are the ones already deployed (the controller's SSH key signs bundles, the device's SSH
host key signs receipts and is pinned in fleet.toml); the receiver gains no dependency (the
`cryptography` wheel is several MB of compiled code, a hand-written pure-Python ed25519 is crypto
nobody reviewed), and SSHSIG's namespaces keep a bundle signature from passing as anything else.
Used by offline.py (the device) and reup.io.offline (the controller).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

BUNDLE_NAMESPACE = "reup-bundle"
RECEIPT_NAMESPACE = "reup-receipt"
CONTROLLER_IDENTITY = "reup-controller"  # the principal in a device's allowed-signers file


class SignatureError(Exception):
    """A signature that does not verify, or no way to make or check one."""


def _keygen() -> str:
    found = shutil.which("ssh-keygen") or ("/usr/bin/ssh-keygen" if os.path.exists("/usr/bin/ssh-keygen") else None)
    if found is None:
        raise SignatureError("ssh-keygen (OpenSSH) not found")
    return found


def sign(key: str, data: bytes, namespace: str) -> bytes:
    """An armored SSHSIG signature of `data` by the private key file `key`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "data")
        with open(path, "wb") as f:
            f.write(data)
        proc = subprocess.run([_keygen(), "-q", "-Y", "sign", "-f", key, "-n", namespace, path],
                              capture_output=True, check=False, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise SignatureError(f"cannot sign with {key}: {proc.stderr.decode(errors='replace').strip()}")
        with open(path + ".sig", "rb") as f:
            return f.read()


def verify(allowed_signers: str, identity: str, data: bytes, signature: bytes, namespace: str) -> None:
    """Raise SignatureError unless `signature` is `identity`'s (per the allowed-signers file) over `data`."""
    with tempfile.TemporaryDirectory() as tmp:
        sig = os.path.join(tmp, "sig")
        with open(sig, "wb") as f:
            f.write(signature)
        proc = subprocess.run([_keygen(), "-Y", "verify", "-f", allowed_signers, "-I", identity, "-n", namespace,
                               "-s", sig], input=data, capture_output=True, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr.decode(errors="replace").strip().splitlines() or ["bad signature"])[-1]
        raise SignatureError(f"signature does not verify for {identity}: {detail}")


def verify_with_key(public_key: str, identity: str, data: bytes, signature: bytes, namespace: str) -> None:
    """verify() against one public key line ('ssh-ed25519 AAAA...')."""
    with tempfile.TemporaryDirectory() as tmp:
        allowed = os.path.join(tmp, "allowed_signers")
        with open(allowed, "w", encoding="ascii") as f:
            f.write(f"{identity} {' '.join(public_key.split()[:2])}\n")
        verify(allowed, identity, data, signature, namespace)
