"""Builds one new store path in the staging area from a stream's entries.

Every write goes through directory file descriptors opened with O_NOFOLLOW, so
no write (and no base-file read) ever passes through a symlink. File contents
come from the literal zstd stream, a base file (copied or hard-linked, with the
optional store-hash rewrite) or a binary patch of one; each file's sha256 and
the path's NAR hash are computed while writing. Used by receive.py.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from reup_receiver.errors import (
    Corrupt,
    HashMismatch,
    MissingBase,
    Oversized,
    UnsafeWrite,
    Unsupported,
)
from reup_receiver.format import pyc
from reup_receiver.format.literal import LiteralStream
from reup_receiver.format.model import (
    ELF_MAP_CODECS,
    F_EXECUTABLE,
    F_REWRITE,
    F_SOLID_TREE,
    FILE_HASH_LEN,
    KIND_DIR,
    KIND_FILE,
    KIND_MIRROR,
    KIND_SYMLINK,
    SOLID_CODECS,
    Codec,
    Entry,
    Method,
    solid_frame_codec,
    split_relpath,
)
from reup_receiver.format.nar import NarHasher, walk_nar_order
from reup_receiver.format.rewrite import rewrite_bytes, rewrite_chunks
from reup_receiver.format.solid import MAX_PREFIX, DoesNotDecode, SolidFrame, SolidLzma
from reup_receiver.patches import MAX_PATCH_OUTPUT, apply_elf_map, apply_patch, check_patch_size

READ_CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_beneath(root_fd: int, parts: list[bytes], what: str) -> int:
    """Open a directory below root_fd, refusing symlinks at every step."""
    fd = os.dup(root_fd)
    try:
        for part in parts:
            try:
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafeWrite(f"{what}: {part!r} is not a directory (symlink?)") from exc
                raise
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


def read_base(host_root: str, parts: list[bytes], label: str,
              chunk: int = READ_CHUNK) -> Iterator[bytes]:
    """Yield a base file's bytes; MissingBase names it if it is absent or not a regular file.

    Empty `parts`: the store path itself is the file (a single-file store path).
    `chunk` -1 reads it in one piece (patch codecs need it whole; no second copy).
    """
    if not parts:
        try:
            fd = os.open(host_root, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise MissingBase(f"base file missing: {label}", label) from exc
        yield from _read_regular(fd, label, chunk)
        return
    try:
        rfd = os.open(host_root, _DIR_FLAGS)
    except OSError as exc:
        raise MissingBase(f"base file missing: {label}", label) from exc
    try:
        try:
            dfd = open_beneath(rfd, parts[:-1], label)
            try:
                fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            finally:
                os.close(dfd)
        except (OSError, UnsafeWrite) as exc:
            raise MissingBase(f"base file missing: {label}", label) from exc
    finally:
        os.close(rfd)
    yield from _read_regular(fd, label, chunk)


def _read_regular(fd: int, label: str, chunk: int) -> Iterator[bytes]:
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise MissingBase(f"base file is not a regular file: {label}", label)
    with os.fdopen(fd, "rb") as fh:
        while data := fh.read(chunk):
            yield data


class FileSink:
    """Writes one file, hashing content (sha256) and NAR as it goes; enforces the size."""

    def __init__(self, fd: int, entry: Entry, nar: NarHasher, label: str) -> None:
        self.fh = os.fdopen(fd, "wb")
        self.entry = entry
        self.nar = nar
        self.sha = hashlib.sha256()
        self.written = 0
        self.label = label

    def write(self, data: bytes) -> int:
        if self.written + len(data) > self.entry.size:
            raise Oversized(f"{self.label}: more data than its declared {self.entry.size} bytes")
        self.fh.write(data)
        self.sha.update(data)
        self.nar.file_data(data)
        self.written += len(data)
        return len(data)

    def close(self) -> None:
        self.fh.close()
        if self.written != self.entry.size:
            raise Corrupt(f"{self.label}: {self.written} bytes, declared {self.entry.size}")
        # An empty hash: a version-2 mirrored COPY, checked by the path's NAR hash (entries.py).
        if self.entry.sha256 and self.sha.digest()[:FILE_HASH_LEN] != self.entry.sha256:
            raise HashMismatch(f"content hash mismatch: {self.label}")



class _Peek:
    """An iterator of entries with one entry of look-ahead."""

    def __init__(self, it: Iterator[Entry]) -> None:
        self.it = it
        self.head: Entry | None = None

    def peek(self) -> Entry | None:
        if self.head is None:
            self.head = next(self.it, None)
        return self.head

    def take(self) -> Entry:
        e = self.peek()
        assert e is not None
        self.head = None
        return e


@dataclass
class _OpenFile:
    entry: Entry
    sink: FileSink
    patch: bytearray = field(default_factory=bytearray)
    received: int = 0


# Resolves (table index, relpath) of a base file to (host dir of its store path, label).
Resolver = Callable[[int, bytes], tuple[str, str]]


class PathBuilder:
    """Materialises one store path under `work_dir` from entries fed in NAR order."""

    def __init__(self, work_dir: str, name: bytes, resolve: Resolver,
                 rewrites: Mapping[bytes, bytes], literal: LiteralStream, nar_limit: int | None = None) -> None:
        self.name = name
        self.top = os.path.join(os.fsencode(work_dir), name)
        self.work_fd = os.open(work_dir, _DIR_FLAGS)
        self.resolve = resolve
        self.rewrites = rewrites
        self.literal = literal
        self.nar = NarHasher(nar_limit)  # declared nar_size: checked as every byte is written
        self.file: _OpenFile | None = None
        self.pending: _Peek | None = None  # entries a MIRROR still has to produce
        self.solid: SolidFrame | SolidLzma | None = None  # the MIRROR's solid frame, if any
        self.solid_codec: Codec | None = None
        self.solid_prefix: bytes | None = None  # the solid dictionary, read at the MIRROR
        self.links: set[bytes] = set()  # relpaths of the symlinks made so far
        self.mirror_source: int | None = None  # table index of the MIRROR's source path

    def mirror_blame(self, why: str) -> MissingBase | None:
        """The error naming the mirror's base path as the one that differs (None: no mirror)."""
        if self.mirror_source is None:
            return None
        label = self.resolve(self.mirror_source, b"")[1]
        return MissingBase(f"base path differs ({why}): {label}", label)

    def label(self, relpath: bytes) -> str:
        return os.fsdecode(self.name + (b"/" + relpath if relpath else b""))

    def close(self) -> None:
        os.close(self.work_fd)

    # Each entry's parent is opened afresh beneath the path's root, never following symlinks.
    def _parent(self, parts: list[bytes]) -> tuple[int, bytes]:
        if not parts:
            return os.dup(self.work_fd), self.name
        root = open_beneath(self.work_fd, [self.name], self.label(b""))
        try:
            return open_beneath(root, parts[:-1], self.label(b"/".join(parts))), parts[-1]
        finally:
            os.close(root)

    def entry(self, e: Entry) -> None:
        if e.kind == KIND_MIRROR:
            if self.pending is not None or self.nar.started:
                raise Corrupt(f"{self.label(b'')}: a mirror must be the path's first entry")
            self.pending = _Peek(self._expand(e))
            self.mirror_source = e.source
            used = {solid_frame_codec(spec.codec) for spec in e.mirror if spec.codec in SOLID_CODECS}
            if len(used) > 1:
                raise Corrupt(f"{self.label(b'')}: a mirror's solid files must share one codec")
            if e.flags & F_SOLID_TREE or used:
                # F_SOLID_TREE without mirrored solid files: the explicit entries name the codec;
                # a SOLID_LZMA frame is only made once its first file comes.
                self.solid_codec = used.pop() if used else None
                self.solid_prefix = self._solid_prefix(e)
                if self.solid_codec is not None:
                    self.solid = self._solid_frame(self.solid_codec)
            return
        if self.file is not None:
            raise Corrupt(f"{self.file.sink.label}: entry before its data ended")
        self._pump(split_relpath(e.relpath, self.label(e.relpath)))
        self._entry(e)

    def _pump(self, before: list[bytes] | None, for_data: bool = False) -> None:
        """Make the mirror's nodes that come before `before` in NAR order (all: None).

        With `for_data`, stop at the first that waits for DATA (a DATA record came);
        otherwise such a node is an error: its data should have come first.
        """
        if self.pending is None:
            if for_data:
                raise Corrupt("data record outside a file")
            return
        while (nxt := self.pending.peek()) is not None:
            if before is not None and not split_relpath(nxt.relpath, "mirror") < before:
                break
            needs_data = nxt.kind == KIND_FILE and nxt.data_len > 0
            if needs_data and not for_data:
                raise Corrupt(f"{self.label(nxt.relpath)}: mirrored file's data missing")
            self._entry(self.pending.take())
            if needs_data:
                return
        if for_data:
            raise Corrupt("data record outside a file")

    def _expand(self, m: Entry) -> Iterator[Entry]:
        """The entries a mirror makes: the source tree's kept nodes, each file per its spec."""
        host, label = self.resolve(m.source, b"")
        if not os.path.lexists(host):
            raise MissingBase(f"base path missing: {label}", label)
        skip = {tuple(split_relpath(r, "mirror skip")) for r in m.skip}
        nodes = [(parts, st) for parts, st in walk_nar_order(host)
                 if not any(tuple(parts[:i]) in skip for i in range(1, len(parts) + 1))]
        n_files = sum(1 for _, st in nodes if stat.S_ISREG(st.st_mode))
        if n_files != len(m.mirror):  # the device's copy is not the tree the encoder saw
            raise MissingBase(f"base path differs ({n_files} files, the mirror lists "
                              f"{len(m.mirror)}): {label}", label)
        specs = iter(m.mirror)
        rewrite = m.flags & F_REWRITE
        for parts, st in nodes:
            relpath = b"/".join(parts)
            if stat.S_ISDIR(st.st_mode):
                yield Entry(KIND_DIR, relpath)
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(os.path.join(os.fsencode(host), relpath) if parts else os.fsencode(host))
                yield Entry(KIND_SYMLINK, relpath,
                            target=rewrite_bytes(target, self.rewrites) if rewrite else target)
            elif stat.S_ISREG(st.st_mode):
                spec = next(specs)
                flags = (F_EXECUTABLE if st.st_mode & 0o100 else 0) | rewrite
                size = st.st_size if spec.method == Method.COPY else spec.size
                yield Entry(KIND_FILE, relpath, flags=flags, size=size, sha256=spec.sha256,
                            method=spec.method, source=m.source, source_relpath=relpath,
                            codec=spec.codec, data_len=spec.data_len)
            else:
                raise MissingBase(f"base path has a special file: {label}", label)

    def _solid_frame(self, codec: Codec) -> SolidFrame | SolidLzma:
        prefix = self.solid_prefix
        assert prefix is not None
        self.solid_prefix = b""  # the frame holds the dictionary now
        return SolidFrame(prefix) if codec == Codec.SOLID else SolidLzma(prefix)

    def _solid_for(self, e: Entry, label: str) -> SolidFrame | SolidLzma:
        """The path's solid frame for a file coded with `e.codec` (made at its first file)."""
        if self.solid_prefix is None:
            raise Corrupt(f"{label}: solid data outside a mirror with solid files")
        assert e.codec is not None
        codec = solid_frame_codec(e.codec)
        if self.solid_codec is None:
            self.solid_codec = codec
        if codec != self.solid_codec:
            raise Corrupt(f"{label}: a mirror's solid files must share one codec")
        if self.solid is None:
            self.solid = self._solid_frame(codec)
        return self.solid

    def _solid_prefix(self, m: Entry) -> bytes:
        """The solid dictionary, rewritten (solid.py): with F_SOLID_TREE every file of the
        source tree, else the old versions of the mirror's SOLID files; NAR order."""
        host, label = self.resolve(m.source, b"")
        skip = {tuple(split_relpath(r, "mirror skip")) for r in m.skip}
        walked = [parts for parts, st in walk_nar_order(host) if stat.S_ISREG(st.st_mode)]
        files = [parts for parts in walked if not any(tuple(parts[:i]) in skip for i in range(1, len(parts) + 1))]
        if len(files) != len(m.mirror):
            raise MissingBase(f"base path differs ({len(files)} files, the mirror lists "
                              f"{len(m.mirror)}): {label}", label)
        wanted = walked if m.flags & F_SOLID_TREE else \
            [parts for parts, spec in zip(files, m.mirror, strict=True) if spec.codec in SOLID_CODECS]
        prefix = bytearray()
        for parts in wanted:
            for chunk in read_base(host, parts, label):
                prefix += chunk
                if len(prefix) > MAX_PREFIX:
                    raise Corrupt(f"{label}: solid dictionary above {MAX_PREFIX} bytes")
        return rewrite_bytes(bytes(prefix), self.rewrites) if m.flags & F_REWRITE else bytes(prefix)

    def _entry(self, e: Entry) -> None:
        if self.file is not None:
            raise Corrupt(f"{self.file.sink.label}: entry before its data ended")
        parts = split_relpath(e.relpath, self.label(e.relpath))
        label = self.label(e.relpath)
        for depth in range(len(parts)):  # named as what it is, before the NAR order check
            if b"/".join(parts[:depth]) in self.links:
                raise UnsafeWrite(f"{label}: would write through the symlink "
                                  f"{self.label(b'/'.join(parts[:depth]))}")
        if e.kind == KIND_FILE and e.method == Method.PATCH:
            check_patch_size(e)  # before a byte of it is read or decoded
        if e.kind == KIND_DIR:
            self.nar.directory(parts)
        elif e.kind == KIND_SYMLINK:
            self.nar.symlink(parts, e.target)
        else:
            self.nar.file_start(parts, e.executable, e.size)
        dfd, base = self._parent(parts)
        try:
            if e.kind == KIND_DIR:
                os.mkdir(base, 0o755, dir_fd=dfd)
            elif e.kind == KIND_SYMLINK:
                os.symlink(e.target, base, dir_fd=dfd)
                self.links.add(e.relpath)
            else:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                fd = os.open(base, flags, 0o755 if e.executable else 0o644, dir_fd=dfd)
                self.file = _OpenFile(e, FileSink(fd, e, self.nar, label))
        except FileExistsError as exc:
            raise UnsafeWrite(f"{label}: already exists") from exc
        finally:
            os.close(dfd)
        if self.file is not None and (e.method == Method.COPY or e.data_len == 0):
            self._complete()

    def data(self, chunk: bytes) -> None:
        if self.file is None:
            self._pump(None, for_data=True)
        f = self.file
        if f is None:
            raise Corrupt("data record outside a file")
        if f.entry.method == Method.PATCH and f.entry.data_len > MAX_PATCH_OUTPUT:
            raise Oversized(f"{f.sink.label}: patch of {f.entry.data_len} bytes exceeds the receiver's limit")
        if f.received + len(chunk) > f.entry.data_len:
            raise Oversized(f"{f.sink.label}: more data than its declared {f.entry.data_len} bytes")
        f.received += len(chunk)
        if f.entry.method == Method.LITERAL:
            self.literal.feed(f.sink, chunk)
        elif f.entry.codec in SOLID_CODECS:
            self._solid_for(f.entry, f.sink.label).feed(f.sink, chunk)
        else:
            f.patch.extend(chunk)
        if f.received == f.entry.data_len:
            self._complete()

    def _complete(self) -> None:
        assert self.file is not None
        e, sink = self.file.entry, self.file.sink
        buf = self.file.patch
        self.file = None  # frees the patch buffer: the decoders get the bytes copy
        # ... except ELF_MAP, which takes the buffer over (and its base): one copy, not two.
        patch = buf if e.method == Method.PATCH and e.codec in ELF_MAP_CODECS else bytes(buf)
        del buf
        try:
            if e.method == Method.COPY:
                host, label = self.resolve(e.source, e.source_relpath)
                chunks = read_base(host, split_relpath(e.source_relpath, label), label)
                if e.flags & F_REWRITE:
                    chunks = rewrite_chunks(chunks, self.rewrites)
                for chunk in chunks:
                    sink.write(chunk)
            elif e.method == Method.PATCH and e.codec == Codec.SOLID_PYC:
                frame = self._solid_for(e, sink.label)
                if not isinstance(frame, SolidLzma):  # pragma: no cover - _solid_for checked the codec
                    raise Corrupt(f"{sink.label}: a pyc recipe outside a SOLID_LZMA frame")
                try:
                    frame.complete_pyc(sink, e.size, e.data_len)
                except (DoesNotDecode, pyc.Mismatch) as exc:
                    # Another compiler than the encoder's: blamed like a base that does not decode,
                    # so the controller encodes again without it instead of sending this again.
                    raise self.mirror_blame(f"{exc}") or exc from exc
            elif e.method == Method.PATCH and e.codec in SOLID_CODECS:
                try:
                    self._solid_for(e, sink.label).complete(sink, e.size, e.data_len)
                except DoesNotDecode as exc:
                    # The dictionary is the base's old files: a changed base file is a base the
                    # device does not have (as a hash mismatch inside a mirror is, below).
                    raise self.mirror_blame("its solid frame does not decode") or exc from exc
            elif e.method == Method.PATCH:
                self._patch(e, sink, patch)
            else:
                self.literal.complete(sink, e.size, e.data_len)
        except BaseException:
            sink.fh.close()
            raise
        try:
            sink.close()
        except HashMismatch as exc:
            if e.codec == Codec.SOLID_PYC:  # the device's compile differs: as above
                raise self.mirror_blame("a regenerated .pyc differs") or exc from exc
            if self.pending is None or e.method == Method.LITERAL:
                raise
            # A mirror trusts the base tree's shape: a changed base file is a base the
            # device does not have, so the controller can fall back.
            label = self.resolve(e.source, e.source_relpath)[1]
            raise MissingBase(f"base file differs: {label}", label) from exc

    def _patch(self, e: Entry, sink: FileSink, patch: bytes | bytearray) -> None:
        host, label = self.resolve(e.source, e.source_relpath)
        old = b"".join(read_base(host, split_relpath(e.source_relpath, label), label, chunk=-1))
        if e.flags & F_REWRITE:
            old = rewrite_bytes(old, self.rewrites)
        assert e.codec is not None
        # ELF_MAP takes its base over (and empties it): the device holds one copy of it, not two.
        base: bytes | bytearray = bytearray(old) if e.codec in ELF_MAP_CODECS else old
        del old
        try:
            if isinstance(base, bytearray):
                apply_elf_map(base, patch, sink, e.size, e.codec)
            else:
                apply_patch(e.codec, base, bytes(patch), sink, e.size)  # bytes already: no copy
        except (Oversized, HashMismatch, Unsupported):
            raise
        except Exception as exc:  # codec libraries raise their own types on bad input
            raise Corrupt(f"{sink.label}: patch does not apply: {exc}") from exc

    def finish(self) -> tuple[bytes, int]:
        if self.file is None:
            self._pump(None)
        if self.file is not None:
            raise Corrupt(f"{self.file.sink.label}: stream ended inside the file's data")
        if self.solid is not None:
            self.solid.finish()
        digest, size = self.nar.finish()
        canonicalise(self.top)
        return digest, size


def canonicalise(top: bytes) -> None:
    """Nix store metadata: read-only modes (exec bit kept), mtime 1, bottom-up."""
    def fix(path: bytes, st: os.stat_result) -> None:
        if stat.S_ISLNK(st.st_mode):
            os.utime(path, (1, 1), follow_symlinks=False)
            return
        mode = 0o555 if stat.S_ISDIR(st.st_mode) or st.st_mode & 0o100 else 0o444
        if stat.S_IMODE(st.st_mode) != mode:
            os.chmod(path, mode)
        if st.st_mtime != 1:
            os.utime(path, (1, 1))

    st = os.lstat(top)
    if stat.S_ISDIR(st.st_mode):
        for dirpath, dirnames, filenames in os.walk(top, topdown=False):
            for name in dirnames + filenames:
                full = os.path.join(dirpath, name)
                fix(full, os.lstat(full))
    fix(top, st)

