"""SOLID_PYC (reup.delta.pycsolid -> reup_receiver.format.pyc, in a SOLID_LZMA frame): round
trip, corruption and hostile sources refused, the receiver's memory bounded, a device whose
compiler differs detected, and the codec used only for a device with this compiler."""

from __future__ import annotations

import importlib.util
import marshal
import os
import random
import signal
import subprocess
import sys
import tracemalloc

import pytest
from reup.delta import pycsolid
from reup.delta import solid as enc
from reup_receiver.errors import Corrupt
from reup_receiver.format import pyc, solid
from reup_receiver.format.literal import STEP, MemorySink
from reup_receiver.format.model import Codec
from reup_receiver.patches import available_codecs
from reup_receiver.protocol import STREAM_V2

DFILE = "/nix/store/00000000000000000000000000000000-lib/lib/python3.11/site-packages/lib/mod.py"


def _source(rnd: random.Random, n: int, kinds: bool = False) -> bytes:
    names = ["pool", "timeout", "header", "request", "retry", "proxy"]
    body = [f'"""Module with {n} functions."""']
    if kinds:  # a frozenset constant: its order follows the compiling process's hash seed
        body.append("def kind(k):\n    return k in {'alpha', 'beta', 'gamma', 'delta', 'eps', 'zeta'}\n")
    for i in range(n):
        a, b = rnd.choice(names), rnd.choice(names)
        body.append(f"def {a}_{b}_{i}({a}, {b}_=None):\n    '''Doc {i}.'''\n    return {a} or {b}_ or {i}\n")
    return "\n".join(body).encode()


def _built(source: bytes, optimize: int = 0, checked: bool = False) -> bytes:
    """The pyc a build would write (this process, not the canonical child)."""
    code = compile(source, DFILE, "exec", dont_inherit=True, optimize=optimize)
    return bytes(importlib._bootstrap_external._code_to_hash_pyc(  # type: ignore[attr-defined]
        code, importlib.util.source_hash(source), checked))


def _decode(prefix: bytes, parts: list[bytes], sizes: list[int], is_pyc: list[bool]) -> list[bytes]:
    frame = solid.SolidLzma(prefix)
    out = []
    for part, size, p in zip(parts, sizes, is_pyc, strict=True):
        sink = MemorySink()
        if part:
            frame.feed(sink, part)
        (frame.complete_pyc if p else frame.complete)(sink, size, len(part))
        out.append(bytes(sink.out))
    frame.finish()
    return out


def _frame(old: bytes, target: bytes, source: bytes, optimize: int = 0) -> tuple[bytes, list[bytes]]:
    """A frame of [the pyc as a recipe, its source], as the encoder makes it."""
    r = pycsolid.recipe(target, source, optimize, DFILE)
    assert r is not None
    parts = enc.lzma_parts(old, [r, source])
    assert parts is not None
    return r, parts


@pytest.mark.parametrize(("optimize", "checked"), [(0, False), (2, True)])
def test_round_trip_and_the_source_is_nearly_free(optimize: int, checked: bool) -> None:
    rnd = random.Random(3)
    old_src = _source(rnd, 60)
    new_src = old_src.replace(b"timeout", b"deadline", 4) + b"\nVERSION = '2.2.3'\n"
    target = _built(new_src, optimize, checked)
    old = old_src + _built(old_src, optimize, checked)
    r, parts = _frame(old, target, new_src, optimize)
    assert pyc.Recipe(*pyc.HEADER.unpack(r[: pyc.HEADER.size])).insert_len == 0  # same compile
    assert _decode(old, parts, [len(target), len(new_src)], [True, False]) == [target, new_src]
    plain = enc.lzma_parts(old, [target, new_src])
    assert plain is not None and len(parts[0]) < len(plain[0]) / 2
    alone = enc.lzma_parts(old, [new_src])
    assert alone is not None and len(parts[0]) < len(alone[0]) + 200  # the pyc costs its recipe header


def test_a_build_that_compiled_otherwise_gets_a_fix_up() -> None:
    """A timestamp pyc (another header) and another frozenset order still rebuild exactly."""
    src = _source(random.Random(4), 20, kinds=True)
    built = bytearray(_built(src))
    built[4:16] = (0).to_bytes(4, "little") + (12345).to_bytes(4, "little") + len(src).to_bytes(4, "little")
    r, parts = _frame(src, bytes(built), src)
    head = pyc.Recipe(*pyc.HEADER.unpack(r[: pyc.HEADER.size]))
    assert head.keep == 4 and head.insert_len >= 12
    assert _decode(src, parts, [len(built), len(src)], [True, False])[0] == built


def test_not_a_compile_of_the_source_gets_no_recipe() -> None:
    src = _source(random.Random(5), 20)
    other = _built(_source(random.Random(6), 20))
    assert pycsolid.recipe(other, src, 0, DFILE) is None
    assert pycsolid.recipe(b"\0" * 4 + _built(src)[4:], src, 0, DFILE) is None  # another magic
    # Bytes that are no marshal stream at all are compared, never unmarshalled (marshal is not safe
    # against crafted input: a package's .pyc must not crash the controller).
    assert pycsolid.recipe(_built(src)[:16] + b"\xe3\xff\xff\xff\x7f" * 400, src, 0, DFILE) is None
    assert pycsolid.source_relpath(b"a/__pycache__/m.%s.opt-2.pyc" % sys.implementation.cache_tag.encode()) \
        == (b"a/m.py", 2)
    assert pycsolid.source_relpath(b"a/__pycache__/m.cpython-27.pyc") is None


def _header(size: int, **kw: int) -> bytes:
    fields = {"source_len": 10, "dfile_len": 5, "keep": 0, "drop": 0, "insert_len": 0, "optimize": 0, "flags": 1}
    fields.update(kw)
    return pyc.Recipe(**fields).pack()


@pytest.mark.parametrize("bad", [
    {"source_len": pyc.MAX_SOURCE + 1}, {"dfile_len": 0}, {"dfile_len": pyc.MAX_DFILE + 1},
    {"insert_len": 101}, {"optimize": 3}, {"flags": 0}, {"drop": pyc.MAX_BASE + 1},
    {"keep": 101, "drop": 20},
])
def test_bad_headers_are_refused_before_the_body_is_cut(bad: dict[str, int]) -> None:
    with pytest.raises(Corrupt):
        pyc.parse_header(_header(100, **bad), 100)


def test_corrupt_frames_are_refused_or_differ() -> None:
    src = _source(random.Random(7), 30)
    target = _built(src)
    _, parts = _frame(src, target, src)
    for pos in (1, 5, len(parts[0]) // 2, len(parts[0]) - 2):
        bad = bytearray(parts[0])
        bad[pos] ^= 0x55
        try:
            got = _decode(src, [bytes(bad), b""], [len(target), len(src)], [True, False])
        except Corrupt:
            continue
        assert got != [target, src]  # the per-file SHA-256 refuses it on the device


@pytest.mark.parametrize("source", [b"def f(:\n", b"(" * 300 + b")" * 300, b"-" * 1_000_000 + b"1",
                                    b"x = '\xff'\n"])
def test_hostile_sources_are_corrupt_not_a_hang(source: bytes) -> None:
    with pytest.raises(Corrupt, match="does not compile"):
        pyc.regenerate(source, DFILE, 0, 1)


def test_another_compile_is_a_mismatch() -> None:
    """The base's length is what the recipe implies, or the receiver blames the base."""
    src = _source(random.Random(8), 10)
    with pytest.raises(pyc.Mismatch):
        pyc.regenerate(src, DFILE, 0, 1, want=len(_built(src)) + 1)
    body = DFILE.encode() + src
    r = pyc.Recipe(len(src), len(DFILE), 0, 0, 0, 0, 1)
    with pytest.raises(pyc.Mismatch):
        pyc.build(r, body, len(_built(src)) - 1)


def test_receiver_memory_is_bounded_by_source_and_file() -> None:
    """Peak memory of a recipe: the frame, the source and the base, a few times; not the child's."""
    src = _source(random.Random(9), 6000)  # ~0.5 MiB of source
    target = _built(src)
    _, parts = _frame(b"#" * 64, target, src)
    tracemalloc.start()
    try:
        out = _decode(b"#" * 64, parts, [len(target), len(src)], [True, False])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out == [target, src]
    assert peak < len(parts[0]) + 3 * (len(src) + len(target)) + 4 * STEP, peak


def test_code_name_and_level_come_from_the_recipe() -> None:
    src = b"def f():\n    '''doc'''\n    assert f\n"
    for optimize in (0, 1, 2):
        r, parts = _frame(b"#" * 64, _built(src, optimize), src, optimize)
        out = _decode(b"#" * 64, parts, [len(_built(src, optimize)), len(src)], [True, False])[0]
        code = marshal.loads(out[16:])
        assert code.co_filename == DFILE and out == _built(src, optimize)


def test_codec_only_for_a_device_with_this_compiler() -> None:
    assert Codec.SOLID_PYC in available_codecs()
    names = [c.name.lower() for c in Codec] + [STREAM_V2]
    same = pycsolid.allowed_codecs([*names, pyc.identity()])
    assert same is not None and Codec.SOLID_PYC in same
    for other in ([*names, "pyc-0123456789abcdef"], names):
        got = pycsolid.allowed_codecs(other)
        assert got is not None and Codec.SOLID_PYC not in got and Codec.SOLID_LZMA in got
    assert pycsolid.allowed_codecs(None) is None
    with pytest.raises(KeyError):
        pycsolid.allowed_codecs(["solid", "nonsense"], strict=True)


def test_a_slow_compile_is_killed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pyc, "TIMEOUT", 0.001)  # less than the child's start-up
    with pytest.raises(Corrupt, match="longer than"):
        pyc.regenerate(_source(random.Random(10), 50), DFILE, 0, 1)


def test_the_fault_campaign_reaches_the_compiler(tmp_path: os.PathLike[str]) -> None:
    """`REUP_FAULT=kill:1` kills the receiver just before the compiler starts (faults.py): the
    campaign's kill-before-subprocess covers the new child."""
    script = ("import sys; from reup_receiver import faults; from reup_receiver.format import pyc\n"
              "faults.install(); pyc.regenerate(b'x = 1\\n', 'm.py', 0, 1); sys.exit(7)\n")
    env = {**os.environ, "REUP_FAULT": "kill:1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    count = os.path.join(tmp_path, "count")
    env["REUP_FAULT"] = f"count:{count}"
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, check=False)
    assert proc.returncode == 7, proc.stderr
    with open(count) as fh:
        events = int(fh.read())
    env["REUP_FAULT"] = f"kill:{events + 1}"  # past the compile's events: the run completes
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, check=False)
    assert proc.returncode == 7, proc.stderr
