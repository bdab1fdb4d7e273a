"""Signed commits: verify that a fleet repo head is signed by an allowed key before deploying it.

Called by the reconcile loop (controller.py) for each new head when `[source]
require_signed = true`. The signature is checked by git itself (`git
verify-commit`) in the controller's bare mirror: SSH signatures against an
allowed-signers file (git's `gpg.ssh.allowedSignersFile`, the `gpg.format=ssh`
style), OpenPGP signatures against the keyring in `gpg_home` (`GNUPGHOME`).
A refused head is reported with a reason: `unsigned` or `bad_signature`
(unknown key, not allowed, or a signature that does not match the commit).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

import pygit2


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str = ""  # "unsigned" or "bad_signature" when refused
    message: str = ""


def verify_commit(git_dir: str, commit: str, *, allowed_signers: str | None = None,
                  gpg_home: str | None = None) -> Verdict:
    obj = pygit2.Repository(git_dir).get(commit)
    if not isinstance(obj, pygit2.Commit):
        return Verdict(False, "bad_signature", f"{commit}: not a commit")
    signature, _ = obj.gpg_signature
    if not signature:
        return Verdict(False, "unsigned", f"commit {commit[:12]} is not signed")
    cmd = ["git", "-C", git_dir, "-c", "gpg.ssh.allowedSignersFile=" + (allowed_signers or "/dev/null")]
    env = {**os.environ, "GNUPGHOME": gpg_home} if gpg_home else dict(os.environ)
    proc = subprocess.run([*cmd, "verify-commit", "--verbose", commit], capture_output=True, text=True,
                          env=env, check=False, timeout=60)
    if proc.returncode != 0:
        detail = " ".join(line for line in proc.stderr.strip().splitlines() if line and not line.startswith(("tree ", "parent ", "author ", "committer ")))
        return Verdict(False, "bad_signature", f"commit {commit[:12]}: signature not accepted: {detail[-300:]}")
    return Verdict(True, "", proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "good signature")
