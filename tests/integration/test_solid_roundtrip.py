"""SOLID end to end with real Nix and reup-receive: a Python package's patch release
(modules and their byte-compiled .pyc changed) travels as one solid frame, applies and
verifies; a device that does not report SOLID gets per-file patches; a device whose
base file differs refuses the stream and keeps its generation."""

from __future__ import annotations

import io
import json
import os
import subprocess
from collections.abc import Iterator

import pytest
from reup.delta import pycsolid
from reup.delta.encode import encode
from reup.delta.stats import DeltaStats
from reup_lab.nixenv import nix_env
from reup_receiver.format import pyc
from reup_receiver.format.entries import EntryCoder
from reup_receiver.format.model import KIND_MIRROR, PATCH_CODECS, SOLID_CODECS, Codec
from reup_receiver.format.wire import T_ENTRY, T_TRAILER, RecordReader
from reup_receiver.protocol import ExitCode
from support.receiverkit import (
    copy_root,
    device_nar_hash,
    host_nar_hash,
    nix_copy,
    nix_verify,
    receive,
    set_generations,
    snapshot,
)

pytestmark = pytest.mark.slow

# Twelve modules, generated deterministically; the release edits half of them.
GEN = (
    "import random, sys\n"
    "r = random.Random(3); edit = int(sys.argv[1]); out = sys.argv[2]\n"
    "words = ['pool', 'timeout', 'header', 'request', 'retry', 'proxy', 'chunk', 'encode']\n"
    "for m in range(12):\n"
    "    lines = ['\"\"\"Module %d.\"\"\"' % m]\n"
    "    for f in range(40):\n"
    "        a, b = r.choice(words), r.choice(words)\n"
    "        extra = '    %s = %s + %d\\n' % (a, b, edit) if edit and m % 2 == 0 and f % 7 == 0 else ''\n"
    "        lines.append('def %s_%s_%d(%s, %s_=None):\\n%s    return %s or %s_\\n' % (a, b, f, a, b, extra, a, b))\n"
    "    open('%s/mod%d.py' % (out, m), 'w').write('\\n'.join(lines))\n"
)


def flake(version: str, edit: int) -> str:
    return f"""
    pkg = derivation {{ name = "python3.11-pylib-{version}"; system = "x86_64-linux"; builder = "/bin/sh";
      gen = ./gen.py;
      args = ["-c" ''PATH=/usr/bin:/bin; set -e; site=$out/lib/python3.11/site-packages/pylib; mkdir -p $site
        python3 $gen {edit} $site
        python3 -m compileall -q $out/lib/python3.11/site-packages'']; }};
    system = derivation {{ name = "nixos-system-s"; system = "x86_64-linux"; builder = "/bin/sh";
      inherit pkg;
      args = ["-c" ''PATH=/usr/bin:/bin; mkdir -p $out/bin; ln -s $pkg $out/sw
        printf '#!/bin/sh\\necho "$1 $REUP_TOPLEVEL" >> "$REUP_ROOT/activations"\\n' > $out/bin/switch-to-configuration
        chmod +x $out/bin/switch-to-configuration'']; }};
    """


@pytest.fixture(scope="module")
def gens(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("solid-flake")
    specs = {"a": ("1.0", 0), "b": ("1.1", 5)}
    body = "".join(f"  nixosConfigurations.{k}.config.system.build.toplevel = let {flake(*v)} in system;\n"
                   for k, v in specs.items())
    (d / "gen.py").write_text(GEN)
    (d / "flake.nix").write_text("{\n outputs = { self }: {\n" + body + " };\n}\n")
    out = []
    for k in specs:
        proc = subprocess.run(
            ["nix", "build", "--json", "--no-link", f"path:{d}#nixosConfigurations.{k}.config.system.build.toplevel"],
            env=nix_env(), capture_output=True, text=True, check=True)
        out.append(json.loads(proc.stdout)[0]["outputs"]["out"])
    return out[0], out[1]


@pytest.fixture(scope="module")
def template_a(gens: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("solid-dev") / "root")
    nix_copy(root, [gens[0]])
    set_generations(root, [gens[0]])
    return root


@pytest.fixture
def root_a(template_a: str, tmp_path: os.PathLike[str]) -> Iterator[str]:
    yield copy_root(template_a, os.path.join(tmp_path, "device"))


def _encode(tmp_path: os.PathLike[str], held: str, target: str, **kw: object) -> tuple[bytes, DeltaStats]:
    out = os.path.join(tmp_path, "stream")
    stats = encode([held], target, out, workers=0, **kw)  # type: ignore[arg-type]
    with open(out, "rb") as fh:
        return fh.read(), stats


def _closure(path: str) -> list[str]:
    proc = subprocess.run(["nix-store", "-qR", path], env=nix_env(), capture_output=True, text=True, check=True)
    return proc.stdout.split()


def test_release_travels_solid_and_verifies(gens: tuple[str, str], root_a: str, tmp_path: os.PathLike[str]) -> None:
    a, b = gens
    stream, stats = _encode(tmp_path, a, b)
    assert stats.ops_by_kind.get("solid", 0) >= 6, stats.ops_by_kind  # six modules + their .pyc
    per_file, per_stats = _encode(tmp_path, a, b, allowed_codecs=list(PATCH_CODECS))
    assert "solid" not in per_stats.ops_by_kind
    assert len(stream) < len(per_file)  # chosen only when smaller
    run = receive(root_a, stream)
    assert run.returncode == 0, run.stderr
    assert nix_verify(root_a, b).returncode == 0
    for p in _closure(b):
        assert device_nar_hash(root_a, p) == host_nar_hash(p), p


def test_device_without_solid_gets_patches(gens: tuple[str, str], root_a: str, tmp_path: os.PathLike[str]) -> None:
    a, b = gens
    stream, _ = _encode(tmp_path, a, b, allowed_codecs=list(PATCH_CODECS))
    run = receive(root_a, stream)
    assert run.returncode == 0, run.stderr
    assert nix_verify(root_a, b).returncode == 0


def test_changed_base_file_is_refused(gens: tuple[str, str], root_a: str, tmp_path: os.PathLike[str]) -> None:
    """The solid dictionary is made from the device's files: a changed one never yields a wrong file."""
    a, b = gens
    stream, _ = _encode(tmp_path, a, b)
    pkg = next(p for p in _closure(a) if "pylib" in p)
    site = os.path.join(root_a, pkg.lstrip("/"), "lib/python3.11/site-packages/pylib")
    os.chmod(site, 0o755)
    for name in os.listdir(site):  # same sizes, other bytes: the dictionary no longer matches
        victim = os.path.join(site, name)
        if name.endswith(".py"):
            size = os.path.getsize(victim)
            os.unlink(victim)  # copy_root may share the template's inodes
            with open(victim, "wb") as fh:
                fh.write(b"#" * size)
    before = snapshot(root_a)
    run = receive(root_a, stream)
    # missing-base naming the path: the controller re-encodes without that base
    assert run.returncode == ExitCode.MISSING_BASE, run.stderr
    assert "pylib" in run.stderr
    assert snapshot(root_a) == before


def _solid_codecs(stream: bytes) -> set[Codec]:
    """The solid codecs the stream's MIRROR entries name (a MIRROR is its path's first entry)."""
    reader = RecordReader(io.BytesIO(stream))
    found: set[Codec] = set()
    while (rec := reader.next())[0] != T_TRAILER:
        tag, payload = rec
        if tag == T_ENTRY and payload[0] == KIND_MIRROR:
            mirror = EntryCoder([b"?"] * 65536, version=2).decode(payload)  # source indices unchecked here
            found |= {f.codec for f in mirror.mirror if f.codec in SOLID_CODECS}
    return found


def test_lzma_frame_for_new_receivers_zstd_for_old(gens: tuple[str, str], root_a: str, template_a: str,
                                                    tmp_path: os.PathLike[str]) -> None:
    """A receiver that lists solid_lzma gets the smaller LZMA2 frame; one that lists only
    solid (older) gets the zstd frame; both apply and verify."""
    a, b = gens
    new_stream, _ = _encode(tmp_path, a, b, allowed_codecs=[c for c in Codec if c != Codec.SOLID_PYC])
    old_stream, old_stats = _encode(tmp_path, a, b, allowed_codecs=[*PATCH_CODECS, Codec.SOLID])
    assert _solid_codecs(new_stream) == {Codec.SOLID_LZMA}
    assert _solid_codecs(old_stream) == {Codec.SOLID}
    assert old_stats.ops_by_kind.get("solid", 0) >= 6
    assert len(new_stream) < len(old_stream)
    for i, stream in enumerate((new_stream, old_stream)):
        root = root_a if i == 0 else copy_root(template_a, os.path.join(tmp_path, "device-old"))
        run = receive(root, stream)
        assert run.returncode == 0, run.stderr
        assert nix_verify(root, b).returncode == 0


def test_pyc_files_are_compiled_on_the_device(gens: tuple[str, str], root_a: str,
                                              tmp_path: os.PathLike[str]) -> None:
    """A receiver listing this interpreter's pyc identity gets the .pyc files as recipes
    (SOLID_PYC): a smaller stream, which applies and verifies."""
    a, b = gens
    reported = receive(root_a, None, "--status").json()["codecs"]
    allowed = pycsolid.allowed_codecs(reported)
    assert pyc.identity() in reported and allowed is not None and Codec.SOLID_PYC in allowed
    stream, _ = _encode(tmp_path, a, b, allowed_codecs=allowed)
    without, _ = _encode(tmp_path, a, b, allowed_codecs=[c for c in allowed if c != Codec.SOLID_PYC])
    assert _solid_codecs(stream) == {Codec.SOLID_LZMA, Codec.SOLID_PYC}
    assert Codec.SOLID_PYC not in _solid_codecs(without)
    assert len(stream) < len(without)
    run = receive(root_a, stream)
    assert run.returncode == 0, run.stderr
    assert nix_verify(root_a, b).returncode == 0


@pytest.mark.parametrize("how", ["same length", "other length"])
def test_device_compiling_otherwise_blames_the_base(gens: tuple[str, str], root_a: str, tmp_path: os.PathLike[str],
                                                    monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """A device whose compile differs from the encoder's (here: the encoder's is altered) refuses
    with missing-base naming the mirror's base, keeps its generation, and the re-encode without
    that base (what the controller does on exit 14) applies: no stream is sent twice."""
    a, b = gens
    real_regenerate, real_recipe = pyc.regenerate, pycsolid.recipe

    def longer(source: bytes, dfile: str, optimize: int, flags: int, want: int = -1) -> bytes:
        base = real_regenerate(source, dfile, optimize, flags, want)  # the device's is one byte shorter
        return base[:16] + b"\0" + base[16:]

    def other_name(target: bytes, source: bytes, optimize: int, name: str) -> bytes | None:
        r = real_recipe(target, source, optimize, name)  # the device compiles another co_filename
        return None if r is None else r[: pyc.HEADER.size + 1] + b"m" + r[pyc.HEADER.size + 2 :]

    if how == "same length":
        monkeypatch.setattr(pycsolid, "recipe", other_name)
    else:
        monkeypatch.setattr(pyc, "regenerate", longer)
    stream, _ = _encode(tmp_path, a, b)
    monkeypatch.undo()
    assert Codec.SOLID_PYC in _solid_codecs(stream)
    before = snapshot(root_a)
    run = receive(root_a, stream)
    assert run.returncode == ExitCode.MISSING_BASE, run.stderr
    base = next(p for p in _closure(a) if "pylib" in p)
    assert os.path.basename(base) in run.stderr, run.stderr
    # same length: the file's hash, or in version 2 (mirrored files without one) the path's NAR hash
    assert ("base path differs" if how == "same length" else "another length") in run.stderr, run.stderr
    assert snapshot(root_a) == before
    again, _ = _encode(tmp_path, a, b, avoid=[base])
    assert Codec.SOLID_PYC not in _solid_codecs(again)
    run = receive(root_a, again)
    assert run.returncode == 0, run.stderr
    assert nix_verify(root_a, b).returncode == 0
