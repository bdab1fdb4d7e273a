"""Signed commits with an OpenPGP keyring (`[source] gpg_home`): real gpg, real git, the controller's
verification (signing.py). The SSH allowed-signers path runs end to end in test_controller_rollout_e2e.py."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest
from reup.io.signing import verify_commit
from reup_lab import demofleet

pytestmark = pytest.mark.skipif(shutil.which("gpg") is None, reason="needs gpg (Debian: gnupg)")


def gpg(home: str, *args: str) -> str:
    proc = subprocess.run(["gpg", "--homedir", home, "--batch", "--quiet", *args], capture_output=True, text=True,
                          check=True, timeout=60)
    return proc.stdout


def new_key(home: str, uid: str) -> str:
    """A passphrase-less ed25519 signing key in a fresh GnuPG home; returns its fingerprint."""
    os.makedirs(home, mode=0o700)
    gpg(home, "--passphrase", "", "--quick-gen-key", uid, "ed25519", "sign", "never")
    for line in gpg(home, "--with-colons", "--list-secret-keys").splitlines():
        if line.startswith("fpr:"):
            return line.split(":")[9]
    raise AssertionError("no key generated")


@pytest.fixture
def homes(tmp_path: os.PathLike[str]) -> Iterator[tuple[str, str, str]]:
    base = str(tmp_path)
    signer, intruder, allowed = (os.path.join(base, n) for n in ("signer", "intruder", "allowed"))
    yield signer, intruder, allowed
    for home in (signer, intruder, allowed):  # the agents gpg started for these homes
        if os.path.isdir(home):
            subprocess.run(["gpgconf", "--homedir", home, "--kill", "all"], capture_output=True, check=False)


def commit(repo: str, message: str, home: str | None, key: str | None) -> str:
    with open(os.path.join(repo, "file"), "a", encoding="utf-8") as f:
        f.write(message + "\n")
    demofleet.git(repo, "add", "file")
    env = {**os.environ, **demofleet.GIT_ENV, **({"GNUPGHOME": home} if home else {})}
    sign = ["-c", "gpg.format=openpgp", "-c", f"user.signingkey={key}", "commit", "-S"] if key else ["commit"]
    subprocess.run(["git", "-C", repo, *sign, "-q", "-m", message], check=True, env=env, capture_output=True)
    return demofleet.git(repo, "rev-parse", "HEAD")


def test_gpg_keyring_signed_commits(tmp_path: os.PathLike[str], homes: tuple[str, str, str]) -> None:
    signer, intruder, allowed = homes
    good, bad = new_key(signer, "Signer <signer@reup.invalid>"), new_key(intruder, "Intruder <x@reup.invalid>")
    os.makedirs(allowed, mode=0o700)  # the controller's keyring: the signer's public key only
    public = os.path.join(str(tmp_path), "signer.asc")
    gpg(signer, "--armor", "--output", public, "--export", good)
    gpg(allowed, "--import", public)

    repo = os.path.join(str(tmp_path), "repo")
    demofleet.init_repo(repo)
    signed = commit(repo, "signed", signer, good)
    unsigned = commit(repo, "unsigned", None, None)
    wrong = commit(repo, "wrong key", intruder, bad)

    verdict = verify_commit(repo, signed, gpg_home=allowed)
    assert verdict.ok, verdict.message
    verdict = verify_commit(repo, unsigned, gpg_home=allowed)
    assert (verdict.ok, verdict.reason) == (False, "unsigned")
    verdict = verify_commit(repo, wrong, gpg_home=allowed)
    assert (verdict.ok, verdict.reason) == (False, "bad_signature") and "signature not accepted" in verdict.message
    # the signer's good signature is refused by a keyring that does not hold its key
    verdict = verify_commit(repo, signed, gpg_home=intruder)
    assert (verdict.ok, verdict.reason) == (False, "bad_signature")
