"""The encoder's side of SOLID_PYC (reup_receiver.format.pyc has the format).

A `.pyc` in a mirror's SOLID_LZMA frame can travel as a recipe: its module's new source,
the name it was compiled under and a fix-up from the canonical compile (this interpreter,
in the same child process the device runs) to the exact file. `recipes` makes them for the
frame's files where the recipe rebuilds the file exactly; strategy.FileCoder.solidify then
codes the frame with and without them and keeps the smaller. `allowed_codecs` turns a
device's status codecs into what the encoder may use: SOLID_PYC only for a device whose
compiler identity equals this interpreter's. Called by strategy.py, cache.py and cli/delta.py.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence

from reup_receiver.errors import Corrupt
from reup_receiver.format import pyc
from reup_receiver.format.model import Codec
from reup_receiver.protocol import PYC_TOKEN, STREAM_V2, pyc_identity

# <dir>/__pycache__/<module>.<cache tag>[.opt-N].pyc, whose source is <dir>/<module>.py
_PYC_NAME = re.compile(rb"((?:.*/)?)__pycache__/([^/.]+)\.([^/.]+)(?:\.opt-([12]))?\.pyc")
_MAX_INSERT_SHARE = 4  # a fix-up above a quarter of the file: the file is not its compile


def allowed_codecs(names: Sequence[str] | None, strict: bool = False) -> list[Codec] | None:
    """The codecs for a device that listed `names` in its status (None: all). Unknown names
    are skipped (`strict`: KeyError); SOLID_PYC needs the device's compiler to be this one."""
    if names is None:
        return None
    out = []
    for name in names:
        if name == STREAM_V2 or PYC_TOKEN.fullmatch(name):
            continue
        if name.upper() not in Codec.__members__:
            if strict:
                raise KeyError(name)
            continue
        out.append(Codec[name.upper()])
    if Codec.SOLID_PYC in out and pyc_identity(names) != pyc.identity():
        out.remove(Codec.SOLID_PYC)
    return out


def source_relpath(relpath: bytes) -> tuple[bytes, int] | None:
    """(the module's source relpath, optimize level) of a pyc named for this interpreter."""
    m = _PYC_NAME.fullmatch(relpath)
    if m is None or m.group(3).decode() != sys.implementation.cache_tag:
        return None
    return m.group(1) + m.group(2) + b".py", int(m.group(4) or 0)


def recipe(target: bytes, source: bytes, optimize: int, name: str) -> bytes | None:
    """The recipe that rebuilds `target` from `source` compiled as `name`, or None if it is not
    its compile.

    `name` is the source's own store path, where builds compile their modules (compileall in
    `$out`). The target is never unmarshalled here: marshal is not safe against crafted bytes, and
    a package's .pyc must not be able to crash the controller. A build that compiled under
    another name differs in that one string, which the fix-up carries.
    """
    if len(target) < 16 or target[:4] != pyc.MAGIC or len(source) > pyc.MAX_SOURCE:
        return None
    flags = int.from_bytes(target[4:8], "little")
    dfile = name.encode()
    try:
        base = pyc.regenerate(source, name, optimize, flags if flags in pyc.HASH_FLAGS else 1)
    except Corrupt:
        return None
    if not 1 <= len(dfile) <= pyc.MAX_DFILE:
        return None
    keep = 0
    limit = min(len(base), len(target))
    while keep < limit and base[keep] == target[keep]:
        keep += 1
    tail = 0
    while tail < limit - keep and base[-1 - tail] == target[-1 - tail]:
        tail += 1
    insert = target[keep : len(target) - tail]
    if len(insert) * _MAX_INSERT_SHARE > len(target):
        return None
    r = pyc.Recipe(len(source), len(dfile), keep, len(base) - keep - tail, len(insert), optimize,
                   flags if flags in pyc.HASH_FLAGS else 1)
    if base[: r.keep] + insert + base[r.keep + r.drop :] != target:  # pragma: no cover - by construction
        return None
    return r.pack() + dfile + source + insert


def recipes(new_path: str, relpaths: Sequence[bytes], contents: Sequence[bytes]) -> list[bytes | None]:
    """Per frame file: its recipe, or None (not a pyc, no source beside it, not its compile)."""
    out: list[bytes | None] = []
    for relpath, content in zip(relpaths, contents, strict=True):
        found = source_relpath(relpath)
        src_host = os.path.join(os.fsencode(new_path), found[0]) if found else b""
        if found is None or not os.path.isfile(src_host) or os.path.islink(src_host):
            out.append(None)
            continue
        with open(src_host, "rb") as fh:
            source = fh.read(pyc.MAX_SOURCE + 1)
        out.append(recipe(content, source, found[1], os.fsdecode(src_host)))
    return out
