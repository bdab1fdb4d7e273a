"""Helpers for the receiver's tests: device roots, running `reup-receive`, snapshots, streams.

A device root is populated from the host's Nix store with `nix copy --to DIR`
(which gives it a real Nix database) plus NixOS-style profile links. Streams
come from the real encoder (`reup.delta.encode`) or are crafted with
support/streams.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from reup_lab.nixenv import nix_env
from reup_receiver.format.nar import nar_hash_tree

BIN = os.path.dirname(sys.executable)
RECEIVE = os.path.join(BIN, "reup-receive")
REUP = os.path.join(BIN, "reup")
STORE = "/nix/store"
# Device roots live on a RAM disk where there is one: the receiver fsyncs every record and
# link, which costs tens of ms each on this machine's disk and would dominate the suite.
SCRATCH = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


# --- device roots ------------------------------------------------------------


def nix_copy(root: str, paths: Sequence[str]) -> None:
    subprocess.run(["nix", "copy", "--no-check-sigs", "--to", root, *paths], env=nix_env(),
                   check=True, capture_output=True)


def set_generations(root: str, toplevels: Sequence[str], current: int | None = None) -> None:
    """Profile links system-1..N-link -> toplevels; `system` -> the `current` one (default: last)."""
    profiles = os.path.join(root, "nix/var/nix/profiles")
    os.makedirs(profiles, exist_ok=True)
    for i, top in enumerate(toplevels, 1):
        os.symlink(top, os.path.join(profiles, f"system-{i}-link"))
    if toplevels:
        os.symlink(f"system-{current or len(toplevels)}-link", os.path.join(profiles, "system"))


def copy_root(src: str, dest: str) -> str:
    subprocess.run(["cp", "-a", src, dest], check=True)
    return dest


def host(root: str, store_path: str) -> str:
    return os.path.join(root, store_path.lstrip("/"))


def visible_paths(root: str) -> set[str]:
    store = os.path.join(root, "nix/store")
    if not os.path.isdir(store):
        return set()
    return {f"{STORE}/{n}" for n in os.listdir(store) if not n.startswith(".")}


def db_rows(root: str) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """(ValidPaths rows, Refs rows as path pairs) of the device's Nix database, sorted."""
    db = os.path.join(root, "nix/var/nix/db/db.sqlite")
    if not os.path.exists(db):
        return [], []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        paths = sorted(conn.execute("SELECT path, hash, narSize, deriver FROM ValidPaths"))
        refs = sorted(conn.execute(
            "SELECT a.path, b.path FROM Refs r JOIN ValidPaths a ON a.id = r.referrer"
            " JOIN ValidPaths b ON b.id = r.reference"))
    return paths, refs


def profile_links(root: str) -> dict[str, str]:
    profiles = os.path.join(root, "nix/var/nix/profiles")
    if not os.path.isdir(profiles):
        return {}
    return {n: os.readlink(os.path.join(profiles, n)) for n in sorted(os.listdir(profiles))
            if os.path.islink(os.path.join(profiles, n))}


def read_activations(root: str) -> list[str]:
    try:
        with open(os.path.join(root, "activations")) as fh:
            return fh.read().splitlines()
    except FileNotFoundError:
        return []


def receiver_records(root: str) -> list[str]:
    d = os.path.join(root, "nix/var/reup/paths")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def snapshot(root: str) -> dict[str, Any]:
    """Everything a failed receive must leave as it was (staging is not part of it)."""
    paths, refs = db_rows(root)
    store = os.path.join(root, "nix/store")
    tops = {}
    for p in sorted(visible_paths(root)):
        st = os.lstat(host(root, p))
        tops[p] = (st.st_mode, st.st_ino, st.st_mtime_ns)
    return {
        "profiles": profile_links(root),
        "store": tops,
        "db_paths": paths,
        "db_refs": refs,
        "records": receiver_records(root),
        "activations": read_activations(root),
        "store_dir_entries": sorted(n for n in os.listdir(store) if not n.startswith("."))
        if os.path.isdir(store) else [],
    }


def current_toplevel(root: str) -> str | None:
    profiles = os.path.join(root, "nix/var/nix/profiles")
    try:
        link = os.readlink(os.path.join(profiles, "system"))
        return os.readlink(os.path.join(profiles, link))
    except OSError:
        return None


# --- running the receiver ----------------------------------------------------


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def receive(root: str, stream: bytes | None, *args: str, env: dict[str, str] | None = None,
            timeout: float = 120) -> Run:
    """Run `reup-receive --root ROOT ARGS` with `stream` on stdin (as a real subprocess)."""
    proc = subprocess.run([RECEIVE, "--root", root, *args], input=stream or b"",
                          capture_output=True, env=env or nix_env(), timeout=timeout,
                          check=False)
    return Run(proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def status(root: str) -> dict[str, Any]:
    run = receive(root, None, "--status")
    assert run.returncode == 0, run.stderr
    return run.json()  # type: ignore[no-any-return]


def assert_one_line_error(run: Run, code: int, *needles: str) -> None:
    lines = run.stderr.strip().splitlines()
    assert run.returncode == code, (run.returncode, run.stderr)
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("reup-receive: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert run.stdout == ""


# --- Nix and NAR hashes ------------------------------------------------------


def host_nar_hash(path: str) -> bytes:
    """sha256 of `nix-store --dump PATH` from the host's store."""
    proc = subprocess.run(["nix-store", "--dump", path], capture_output=True, check=True,
                          env=nix_env())
    return hashlib.sha256(proc.stdout).digest()


def device_nar_hash(root: str, path: str) -> bytes:
    return nar_hash_tree(host(root, path))[0]


def nix_verify(root: str, path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nix", "store", "verify", "--no-trust", "--store", root, "-r", path],
                          env=nix_env(), capture_output=True, text=True, check=False)


# --- streams -----------------------------------------------------------------


def encode_stream(held: Sequence[str], target: str, out: str,
                  staged: Sequence[str] = ()) -> bytes:
    from reup.delta.encode import encode

    encode(list(held), target, out, staged=list(staged), version=1)  # tests decode and edit version 1
    with open(out, "rb") as fh:
        return fh.read()


class StreamCache:
    """Streams from the real encoder, each encoded once per session."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.cache: dict[tuple[tuple[str, ...], str, tuple[str, ...]], bytes] = {}

    def get(self, held: Sequence[str], target: str, staged: Sequence[str] = ()) -> bytes:
        key = (tuple(held), target, tuple(staged))
        if key not in self.cache:
            out = os.path.join(self.directory, f"stream-{len(self.cache)}")
            self.cache[key] = encode_stream(held, target, out, staged)
        return self.cache[key]


def empty_db_root(root: str) -> str:
    """A device root with an empty Nix database (as Nix creates it) and no paths."""
    subprocess.run(["nix", "store", "ping", "--store", root], env=nix_env(), check=True,
                   capture_output=True)
    return root
