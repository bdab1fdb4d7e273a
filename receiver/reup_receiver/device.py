"""The device's filesystem layout: store, staging, profiles, lock and path records.

A device root follows NixOS conventions (`nix/store`, `nix/var/nix/profiles/
system -> system-N-link -> /nix/store/...`). Everything the receiver changes
on the device goes through `Device`, so each step is atomic: trees and links
appear by rename. Used by receive.py, maintenance.py and cli.py.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator

from reup_receiver import nixdb
from reup_receiver.errors import Locked, ReceiveError
from reup_receiver.nixdb import PathRecord

_GEN_RE = re.compile(r"^system-(\d+)-link$")


class Device:
    def __init__(self, root: str, store_dir: str = "/nix/store") -> None:
        self.root = os.path.abspath(root)
        self.store_dir = store_dir
        self.store = self.host(store_dir)
        self.staging = os.path.join(self.store, ".reup-staging")
        self.work = os.path.join(self.staging, "work")
        self.done = os.path.join(self.staging, "done")
        self.trash = os.path.join(self.staging, "trash")
        self.profiles = self.host("/nix/var/nix/profiles")
        self.state = self.host("/nix/var/reup")
        self.records_dir = os.path.join(self.state, "paths")
        self.db = nixdb.NixDb(self.root, self.host("/nix/var/nix/db"))

    def host(self, device_path: str) -> str:
        """Where a device-absolute path lives on this filesystem."""
        return os.path.join(self.root, device_path.lstrip("/"))

    # --- locking and setup ---------------------------------------------------

    @contextlib.contextmanager
    def lock(self, wait: bool = False) -> Iterator[None]:
        os.makedirs(self.state, exist_ok=True)
        fd = os.open(os.path.join(self.state, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError as exc:
                raise Locked("another reup-receive is running on this device") from exc
            yield
        finally:
            os.close(fd)

    def prepare_staging(self) -> None:
        for d in (self.store, self.staging, self.done, self.records_dir):
            os.makedirs(d, exist_ok=True)
        # Work trees of an interrupted receive are incomplete by definition.
        for d in (self.work, self.trash):
            if os.path.lexists(d):
                make_writable_tree(d)
                shutil.rmtree(d)
            os.makedirs(d)
        # A record without its tree is the trace of a kill between the two renames.
        for name in os.listdir(self.done):
            if name.endswith(".json") and not os.path.lexists(os.path.join(self.done, name[:-5])):
                os.unlink(os.path.join(self.done, name))

    # --- store paths -----------------------------------------------------------

    def store_path(self, name: str) -> str:
        return self.store_dir + "/" + name

    def present(self, name: str) -> bool:
        return os.path.lexists(os.path.join(self.store, name))

    def valid_paths(self) -> set[str]:
        """Store paths the device holds completely: the Nix DB's view if it has one."""
        if self.db.exists():
            return self.db.valid_paths()
        if not os.path.isdir(self.store):
            return set()
        return {self.store_path(n) for n in os.listdir(self.store) if not n.startswith(".")}

    def staged(self) -> dict[str, PathRecord]:
        out = {}
        if os.path.isdir(self.done):
            for name in os.listdir(self.done):
                if name.endswith(".json") and os.path.lexists(os.path.join(self.done, name[:-5])):
                    with open(os.path.join(self.done, name)) as fh:
                        rec = PathRecord.from_json(json.load(fh))
                    out[rec.path] = rec
        return out

    def record(self, rec: PathRecord) -> None:
        os.makedirs(self.records_dir, exist_ok=True)
        write_atomic(os.path.join(self.records_dir, os.path.basename(rec.path) + ".json"),
                     json.dumps(rec.to_json()).encode())

    def records(self) -> dict[str, PathRecord]:
        out = {}
        if os.path.isdir(self.records_dir):
            for name in os.listdir(self.records_dir):
                if name.endswith(".json"):
                    with open(os.path.join(self.records_dir, name)) as fh:
                        rec = PathRecord.from_json(json.load(fh))
                    out[rec.path] = rec
        return out

    def forget(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.records_dir, os.path.basename(path) + ".json"))

    def remove_tree(self, host_path: str) -> None:
        """Make a tree invisible at once (rename into trash), then delete it."""
        os.makedirs(self.trash, exist_ok=True)
        dest = os.path.join(self.trash, f"{os.path.basename(host_path)}.{os.getpid()}")
        os.rename(host_path, dest)
        make_writable_tree(dest)
        if os.path.isdir(dest) and not os.path.islink(dest):
            shutil.rmtree(dest)
        else:
            os.unlink(dest)

    # --- profiles ------------------------------------------------------------

    def generations(self) -> list[tuple[int, str]]:
        out = []
        if os.path.isdir(self.profiles):
            for name in os.listdir(self.profiles):
                m = _GEN_RE.match(name)
                if m:
                    with contextlib.suppress(OSError):
                        out.append((int(m.group(1)), os.readlink(os.path.join(self.profiles, name))))
        return sorted(out)

    def current(self) -> tuple[int, str] | None:
        link = os.path.join(self.profiles, "system")
        try:
            target = os.readlink(link)
        except OSError:
            return None
        m = _GEN_RE.match(os.path.basename(target))
        if not m:
            return None
        try:
            return int(m.group(1)), os.readlink(os.path.join(self.profiles, os.path.basename(target)))
        except OSError:
            return None

    def add_generation(self, toplevel: str) -> int:
        os.makedirs(self.profiles, exist_ok=True)
        number = max((n for n, _ in self.generations()), default=0) + 1
        symlink_atomic(toplevel, os.path.join(self.profiles, f"system-{number}-link"))
        return number

    def switch_to(self, number: int) -> None:
        symlink_atomic(f"system-{number}-link", os.path.join(self.profiles, "system"))

    def drop_generation(self, number: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.profiles, f"system-{number}-link"))


def symlink_atomic(target: str, link: str) -> None:
    tmp = f"{link}.reup-tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.rename(tmp, link)
    fsync_dir(os.path.dirname(link))


def write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.reup-tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.rename(tmp, path)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_writable_tree(path: str) -> None:
    """Store trees are read-only; deleting them needs write bits on directories."""
    if os.path.islink(path) or not os.path.isdir(path):
        return
    for dirpath, dirnames, _ in os.walk(path):
        os.chmod(dirpath, 0o755)
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if not os.path.islink(full):
                os.chmod(full, 0o755)


def translate_oserror(exc: OSError, what: str) -> ReceiveError:
    from reup_receiver.errors import DiskFull

    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"disk full while {what}")
    return ReceiveError(f"{what}: {exc}")
