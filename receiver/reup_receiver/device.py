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
import stat
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
                delete_tree(d)
            os.makedirs(d)
        # A record without its tree is the trace of a kill between the two renames; a tree
        # without its record was never verified (or was being replaced): neither is kept.
        names = set(os.listdir(self.done))
        for name in names:
            if name.endswith(".json") and name[:-5] not in names:
                os.unlink(os.path.join(self.done, name))
            elif not name.endswith(".json") and not name.endswith(".reup-tmp") and name + ".json" not in names:
                delete_tree(os.path.join(self.done, name))

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
        delete_tree(dest)

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

    def add_link(self, number: int, toplevel: str) -> None:
        os.makedirs(self.profiles, exist_ok=True)
        symlink_atomic(toplevel, os.path.join(self.profiles, f"system-{number}-link"))

    def clear_system(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.profiles, "system"))
            fsync_dir(self.profiles)

    def free_bytes(self) -> int:
        """Bytes an unprivileged writer may still use on the store's filesystem (statvfs)."""
        st = os.statvfs(self.store)
        return st.f_bavail * st.f_frsize

    def clear_work(self) -> None:
        """Remove the work tree of a receive that did not finish (kept: verified `done` paths)."""
        if os.path.lexists(self.work):
            delete_tree(self.work)
        os.makedirs(self.work, exist_ok=True)

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


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: str, b: str) -> None:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE): neither is ever missing."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        raise ReceiveError("this system has no renameat2: cannot replace a store path atomically")
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), b)
    fsync_dir(os.path.dirname(b))


def write_atomic(path: str, data: bytes) -> None:
    """Temp file, fsync, rename, fsync the directory: the old or the new content, never a torn one."""
    tmp = f"{path}.reup-tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.rename(tmp, path)
    fsync_dir(os.path.dirname(path))


def append_line(path: str, line: str) -> None:
    """Append one line to a JSONL log durably; a torn last line is skipped by `read_jsonl_last`."""
    with open(path, "a+b") as fh:
        fh.seek(0, os.SEEK_END)
        if fh.tell():
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")  # a torn earlier line ends here instead of swallowing this one
        fh.write(line.encode() + b"\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl_last(path: str) -> object:
    """The last complete JSON line of a log (None: none); torn or garbage lines are skipped."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - (1 << 16)))
            lines = fh.read().splitlines()
    except OSError:
        return None
    for raw in reversed(lines):
        try:
            return json.loads(raw)
        except ValueError:
            continue
    return None


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def delete_tree(path: str) -> None:
    """Delete a (read-only) store tree without recursion: any depth, never through a symlink.

    Directories are opened with O_NOFOLLOW relative to their parent's descriptor, so neither the
    depth nor the length of the tree's paths matters (invariant: no recursion over a depth a
    stream chooses).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    os.chmod(path, 0o755)
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    stack: list[tuple[int, str]] = [(os.open(path, flags), "")]  # (open directory, its name), deepest last
    try:
        while stack:
            fd = stack[-1][0]
            child = None
            with os.scandir(fd) as it:
                entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
            for name, is_dir in entries:
                if is_dir:
                    child = name
                else:
                    os.unlink(name, dir_fd=fd)
            if child is None:
                _, name = stack.pop()
                os.close(fd)
                if stack:
                    os.rmdir(name, dir_fd=stack[-1][0])
                continue
            cfd = os.open(child, flags, dir_fd=fd)
            stack.append((cfd, child))
            os.chmod(cfd, 0o755)
    finally:
        for fd, _ in stack:
            os.close(fd)
    os.rmdir(path)


def translate_oserror(exc: OSError, what: str) -> ReceiveError:
    from reup_receiver.errors import DiskFull

    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"disk full while {what}")
    return ReceiveError(f"{what}: {exc}")
