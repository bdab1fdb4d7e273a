"""SOLID_PYC: a `.pyc` file that the device compiles from its source instead of receiving it.

A `.pyc` is a 16-byte header (magic, flags, and for hash-based pycs the source's hash)
followed by `marshal.dumps(compile(source, dfile, "exec", optimize=N))`; everything in it
follows from the source, the name the code was compiled under (`dfile`, the code's
`co_filename`), the optimisation level and the header flags. In a mirror's SOLID_LZMA frame
(solid.py) a SOLID_PYC file's part is a *recipe* instead of the file's bytes:

    u32 source_len, u16 dfile_len, u32 keep, u32 drop, u32 insert_len, u8 optimize, u8 flags
    dfile, source, insert                                    (integers little-endian)

The receiver compiles the source in a canonical child interpreter (`regenerate`: the
receiver's own `sys.executable` with `-s -S`, a clean environment with PYTHONHASHSEED=0,
so that marshal's reference flags and frozenset orders do not depend on the receiver's
state), giving the *base*, and writes base[:keep] + insert + base[keep + drop:]; the fix-up
covers what the build's own compile did differently (usually nothing). The source is then
in the frame's LZMA window, so the module's `.py`, which NAR order puts after its
`__pycache__`, costs a few bytes as a repeat. The file's SHA-256 is checked as always.

The encoder (reup.delta.pycsolid) uses the codec only for a device whose status lists the
`pyc-<identity>` token of the controller's own interpreter (`identity`, protocol.
allowed_codecs), after checking that its own recipe rebuilds the file exactly. A base of
another length than the recipe implies, or a file whose hash differs, is blamed on the
mirror's base (`Mismatch`, as a solid frame that does not decode): the controller encodes
again without that base, never the same stream twice.

Bounds: the source (`MAX_SOURCE`), dfile (`MAX_DFILE`) and insert (the declared size) are
checked before they are cut from the frame; the child runs under RLIMIT_AS `CHILD_MEMORY`,
RLIMIT_CPU and a wall-clock `TIMEOUT` (then killed), and writes its output only if it has
exactly the length the recipe implies, so the receiver never reads more than that.
A source that does not compile (SyntaxError, RecursionError, MemoryError, ...) is Corrupt.
Receiver: solid.SolidLzma; encoder: reup.delta.pycsolid.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
from dataclasses import dataclass
from importlib.util import MAGIC_NUMBER

from reup_receiver.errors import Corrupt

HEADER = struct.Struct("<IHIIIBB")
MAGIC: bytes = MAGIC_NUMBER  # this interpreter's pyc magic
MAX_SOURCE = 4 << 20
MAX_DFILE = 4096
MAX_BASE = 64 << 20  # a regenerated base the receiver accepts (bounds `drop`)
HASH_FLAGS = (1, 3)  # unchecked-hash and checked-hash pycs (timestamp ones: via the fix-up)
CHILD_MEMORY = 1 << 30
CHILD_CPU_SECONDS = 60
TIMEOUT = 120.0
TOKEN_PREFIX = "pyc-"

# The canonical compile: only builtin and frozen modules before the compile (nothing found on a
# path), limits first. argv: dfile, optimize, flags, expected length. Exit 3: other length.
_CHILD = rf"""
import sys, resource
resource.setrlimit(resource.RLIMIT_AS, ({CHILD_MEMORY}, {CHILD_MEMORY}))
resource.setrlimit(resource.RLIMIT_CPU, ({CHILD_CPU_SECONDS}, {CHILD_CPU_SECONDS}))
import _imp, _frozen_importlib_external as be
src = sys.stdin.buffer.read()
dfile, opt, flags, want = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
code = compile(src, dfile, "exec", dont_inherit=True, optimize=opt)
out = be._code_to_hash_pyc(code, _imp.source_hash(be._RAW_MAGIC_NUMBER, src), flags == 3)
if want >= 0 and len(out) != want:
    sys.exit(3)
sys.stdout.buffer.write(out)
"""


class Mismatch(Corrupt):
    """The regenerated base is not the one the encoder saw: another compiler (blamed on the
    mirror's base by the builder, as a solid frame that does not decode)."""


@dataclass(frozen=True)
class Recipe:
    source_len: int
    dfile_len: int
    keep: int
    drop: int
    insert_len: int
    optimize: int
    flags: int

    @property
    def body_len(self) -> int:
        return self.dfile_len + self.source_len + self.insert_len

    def base_len(self, size: int) -> int:
        return size - self.insert_len + self.drop

    def pack(self) -> bytes:
        return HEADER.pack(self.source_len, self.dfile_len, self.keep, self.drop, self.insert_len,
                           self.optimize, self.flags)


def parse_header(head: bytes, size: int) -> Recipe:
    """A recipe's fixed header, checked against the file's declared size before its body is cut."""
    if len(head) != HEADER.size:
        raise Corrupt("pyc recipe: truncated header")
    r = Recipe(*HEADER.unpack(head))
    if r.source_len > MAX_SOURCE or not 1 <= r.dfile_len <= MAX_DFILE:
        raise Corrupt(f"pyc recipe: source of {r.source_len} bytes, name of {r.dfile_len} "
                      f"(limits {MAX_SOURCE}, {MAX_DFILE})")
    if r.insert_len > size or r.drop > MAX_BASE or r.optimize > 2 or r.flags not in HASH_FLAGS:
        raise Corrupt("pyc recipe: bad fix-up or compile parameters")
    base = r.base_len(size)
    if not 16 <= base <= MAX_BASE or r.keep + r.drop > base:
        raise Corrupt(f"pyc recipe: a base of {base} bytes cannot make {size}")
    return r


def split_body(r: Recipe, body: bytes) -> tuple[str, bytes, bytes]:
    """(dfile, source, insert) of a recipe's body."""
    if len(body) != r.body_len:
        raise Corrupt("pyc recipe: truncated body")
    try:
        dfile = body[: r.dfile_len].decode()
    except UnicodeDecodeError as exc:
        raise Corrupt("pyc recipe: name is not UTF-8") from exc
    if "\0" in dfile:
        raise Corrupt("pyc recipe: NUL in name")
    source = body[r.dfile_len : r.dfile_len + r.source_len]
    return dfile, source, body[r.dfile_len + r.source_len :]


def build(r: Recipe, body: bytes, size: int) -> bytes:
    """The file a recipe makes (`size` bytes); Corrupt if the source does not compile, Mismatch
    if this interpreter's compile is not the base the encoder saw."""
    dfile, source, insert = split_body(r, body)
    base = regenerate(source, dfile, r.optimize, r.flags, r.base_len(size))
    out = base[: r.keep] + insert + base[r.keep + r.drop :]
    if len(out) != size:  # pragma: no cover - parse_header and the child's length check
        raise Corrupt("pyc recipe: wrong output length")
    return out


def _argv(dfile: str, optimize: int, flags: int, want: int) -> list[str]:
    # -s -S: no user or site packages; -P (3.11+): no script or working directory on the path.
    extra = ["-P"] if sys.version_info >= (3, 11) else []
    return [sys.executable, "-s", "-S", *extra, "-c", _CHILD, dfile, str(optimize), str(flags), str(want)]


def regenerate(source: bytes, dfile: str, optimize: int, flags: int, want: int = -1) -> bytes:
    """The canonical pyc of `source` from this interpreter, in a fresh child (`want` >= 0: its
    exact expected length, else Mismatch)."""
    if not sys.executable:
        raise Mismatch("pyc recipe: this receiver cannot start its interpreter")
    env = {"PYTHONHASHSEED": "0", "LC_ALL": "C"}  # env is ours: no PYTHON* from the caller
    try:
        proc = subprocess.Popen(_argv(dfile, optimize, flags, want), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd="/",
                                close_fds=True)
    except OSError as exc:
        raise Mismatch(f"pyc recipe: cannot start the compiler: {exc}") from exc
    try:
        out, err = proc.communicate(source, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        proc.communicate()
        raise Corrupt(f"pyc recipe: compiling {dfile[:200]!r} took longer than {TIMEOUT:.0f} s") from exc
    if proc.returncode == 3:
        raise Mismatch(f"pyc recipe: {dfile[:200]!r} compiles to another length than the encoder's")
    if proc.returncode != 0:
        last = err.decode(errors="replace").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        raise Corrupt(f"pyc recipe: {dfile[:200]!r} does not compile: {last[0][:300]}")
    return out


def identity() -> str:
    """The `--status` codecs token naming this interpreter as a compiler: a device and a
    controller with equal tokens compile every source to the same bytes."""
    ident = "\0".join((sys.version, sys.implementation.name, str(sys.implementation.cache_tag),
                       MAGIC_NUMBER.hex(), sys.platform, str(sys.maxsize)))
    return TOKEN_PREFIX + hashlib.sha256(ident.encode()).hexdigest()[:16]


def usable() -> bool:
    """Whether this receiver can compile (a known interpreter to start)."""
    return bool(sys.executable) and os.access(sys.executable, os.X_OK)
