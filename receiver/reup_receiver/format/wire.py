"""Framing of a reup stream: header, length-prefixed records, trailer digest.

The normative description is docs/stream-format.md. `RecordWriter` is used by
the encoder (reup.delta); `RecordReader` by the receiver (receive.py). Both
also provide the little-endian varint/bytes primitives the manifest and
operation bodies are made of (`Buf`, `put_*`).
"""

from __future__ import annotations

import hashlib
import struct
from typing import BinaryIO

from reup_receiver.errors import BadMagic, Corrupt, Oversized, Truncated

MAGIC = b"\x89REUP\r\n\x1a"
VERSION = 2  # the newest version this code writes and reads
VERSIONS = (1, 2)  # read: 1 full manifest; 2 compact manifest (manifest2.py), capability STREAM_V2
HEADER = struct.Struct("<8sHH")
STREAM_BYTES = struct.Struct("<Q")  # first field of the MANIFEST record

# Record tags.
T_MANIFEST = 0x01
T_PATH = 0x02
T_ENTRY = 0x03
T_DATA = 0x04
T_PATH_END = 0x05
T_TRAILER = 0xFF

DATA_CHUNK = 1 << 20  # encoder's DATA record size
# Largest payload a receiver accepts per tag: a corrupt length never makes it allocate more.
MAX_PAYLOAD = {
    T_MANIFEST: 256 << 20,
    T_PATH: 16,
    T_ENTRY: 1 << 20,
    T_DATA: DATA_CHUNK,
    T_PATH_END: 16,
    T_TRAILER: 32,
}
DIGEST_SIZE = 32


# --- primitives --------------------------------------------------------------


def put_varint(out: bytearray, value: int) -> None:
    if value < 0:
        raise ValueError("varint must be >= 0")
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


def put_bytes(out: bytearray, data: bytes) -> None:
    put_varint(out, len(data))
    out += data


class Buf:
    """Cursor over one record's payload; every overrun is a Corrupt error."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.what = what

    def _take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            raise Corrupt(f"malformed {self.what}: runs past its record")
        chunk = bytes(self.data[self.pos : end])
        self.pos = end
        return chunk

    def u8(self) -> int:
        return self._take(1)[0]

    def varint(self) -> int:
        result = shift = 0
        while True:
            byte = self.u8()
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7
            if shift > 63:
                raise Corrupt(f"malformed {self.what}: varint too long")

    def raw(self, n: int) -> bytes:
        return self._take(n)

    def bytes(self, limit: int = 1 << 16) -> bytes:
        n = self.varint()
        if n > limit:
            raise Corrupt(f"malformed {self.what}: field of {n} bytes")
        return self._take(n)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise Corrupt(f"malformed {self.what}: {len(self.data) - self.pos} stray bytes")


# --- writer ------------------------------------------------------------------


class RecordWriter:
    """Writes records to a binary file, hashing them for the trailer.

    The encoder writes the body (paths) to a scratch file with `header=False`,
    then the final stream: header, manifest, `copy_from(body)`, `trailer()`.
    """

    def __init__(self, out: BinaryIO, *, header: bool = True, version: int = VERSION) -> None:
        if version not in VERSIONS:
            raise ValueError(f"unknown stream version {version}")
        self.out = out
        self.digest = hashlib.sha256()
        self.size = 0
        self.counts: dict[int, int] = {}
        if header:
            self._write(HEADER.pack(MAGIC, version, 0))

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        self.out.write(data)
        self.digest.update(data)
        self.size += len(data)

    def record(self, tag: int, payload: bytes | bytearray | memoryview) -> None:
        if len(payload) > MAX_PAYLOAD[tag]:
            raise ValueError(f"record {tag:#x} of {len(payload)} bytes exceeds the limit")
        head = record_head(tag, len(payload))
        self._write(head)
        self._write(payload)
        self.counts[tag] = self.counts.get(tag, 0) + len(head) + len(payload)

    def data(self, blob: bytes | bytearray | memoryview) -> None:
        view = memoryview(blob)
        for off in range(0, len(view), DATA_CHUNK):
            self.record(T_DATA, view[off : off + DATA_CHUNK])

    def copy_from(self, body: BinaryIO) -> None:
        while chunk := body.read(1 << 20):
            self._write(chunk)

    def trailer(self) -> None:
        """The digest covers every byte before it, the trailer's own record header included."""
        self._write(record_head(T_TRAILER, DIGEST_SIZE))
        digest = self.digest.digest()
        self.out.write(digest)
        self.size += DIGEST_SIZE


def record_head(tag: int, length: int) -> bytes:
    head = bytearray([tag])
    put_varint(head, length)
    return bytes(head)


def stream_size(manifest_payload_len: int, body_len: int) -> int:
    """Total bytes of a stream with this manifest payload and body."""
    manifest = len(record_head(T_MANIFEST, manifest_payload_len)) + manifest_payload_len
    trailer = len(record_head(T_TRAILER, DIGEST_SIZE)) + DIGEST_SIZE
    return HEADER.size + manifest + body_len + trailer


# --- reader ------------------------------------------------------------------


class RecordReader:
    """Reads records from a non-seekable binary stream, hashing as it goes.

    `limit` (the manifest's stream_bytes) bounds what is read; `finish` checks
    the trailer digest and that nothing follows it.
    """

    def __init__(self, inp: BinaryIO) -> None:
        self.inp = inp
        self.digest = hashlib.sha256()
        self.bytes_read = 0
        self.limit: int | None = None
        header = self._read(HEADER.size, "header", hash_it=True, allow_empty=True)
        magic, version, _flags = HEADER.unpack(header)
        if magic != MAGIC:
            raise BadMagic("not a reup stream (bad magic)")
        if version not in VERSIONS:
            raise BadMagic(f"unsupported stream version {version} (this receiver reads {VERSIONS})")
        self.version = version

    def _read(self, n: int, what: str, *, hash_it: bool, allow_empty: bool = False) -> bytes:
        if self.limit is not None and self.bytes_read + n > self.limit:
            raise Oversized(f"stream is larger than the {self.limit} bytes its manifest declares")
        parts = []
        got = 0
        while got < n:
            chunk = self.inp.read(n - got)
            if not chunk:
                if allow_empty and got == 0 and what == "header":
                    raise Truncated("empty stream")
                raise Truncated(f"stream truncated in {what} at byte {self.bytes_read + got}")
            parts.append(chunk)
            got += len(chunk)
        data = b"".join(parts)
        self.bytes_read += n
        if hash_it:
            self.digest.update(data)
        return data

    def next(self) -> tuple[int, bytes]:
        """The next record as (tag, payload). The trailer's payload is not hashed."""
        at = self.bytes_read
        tag = self._read(1, "record header", hash_it=True)[0]
        cap = MAX_PAYLOAD.get(tag)
        if cap is None:
            raise Corrupt(f"unknown record tag {tag:#x} at byte {at}")
        length = shift = 0
        while True:  # varint, bounded by the tag's cap so a corrupt length stops early
            byte = self._read(1, "record header", hash_it=True)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if length > cap:
                raise Corrupt(f"record {tag:#x} at byte {at} declares more than {cap} bytes")
            if not byte & 0x80:
                break
            if shift > 28:
                raise Corrupt(f"record {tag:#x} at byte {at}: length varint too long")
        payload = self._read(length, f"record {tag:#x}", hash_it=tag != T_TRAILER)
        return tag, payload

    def check_trailer(self, payload: bytes) -> None:
        if len(payload) != DIGEST_SIZE or payload != self.digest.digest():
            raise Corrupt("stream digest mismatch: the stream was corrupted in transit")
        if self.limit is not None and self.bytes_read != self.limit:
            raise Corrupt(f"stream is {self.bytes_read} bytes, its manifest declares {self.limit}")
        if self.inp.read(1):
            raise Oversized("data after the trailer: stream larger than its manifest says")
