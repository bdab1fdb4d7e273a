"""The delta engine end to end with real Nix: every operation kind and codec applies and verifies.

A dedicated flake (three generations) exercises what the engine must handle:
a shared library whose soname file is renamed on a version bump
(`libfoo.so.1.5.5` -> `libfoo.so.1.5.6`), a program linked to it with an
RPATH, a wrapper script that differs only in store hashes, a data file with
small edits (binary patches), and a mass rebuild where a base library's hash
changes but no content does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from reup.delta.encode import encode
from reup.delta.stats import DeltaStats
from reup_lab.nixenv import nix_env
from reup_receiver.format import pyc
from reup_receiver.format.entries import EntryCoder
from reup_receiver.format.manifest import decode_manifest
from reup_receiver.format.manifest2 import decode_manifest_v2
from reup_receiver.format.model import PATCH_CODECS, Codec, Method
from reup_receiver.format.wire import T_ENTRY, T_MANIFEST, T_PATH, T_TRAILER, RecordReader
from reup_receiver.protocol import STREAM_V2
from support.receiverkit import (
    REUP,
    assert_one_line_error,
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

DATA = (
    "python3 -c 'import random,sys; r=random.Random(5); "
    "b=bytearray(r.getrandbits(8) for _ in range(200000)); "
    "[b.__setitem__(r.randrange(len(b)), 0) for _ in range(int(sys.argv[1]))]; "
    "sys.stdout.buffer.write(bytes(b))' "
)


def flake(version: str, edits: int, base_tag: str) -> str:
    lib_c = "int foo_version(void) { return " + version.replace(".", "") + "; }"
    return f"""
    base = derivation {{ name = "libbase-1.0"; system = "x86_64-linux"; builder = "/bin/sh";
      tag = "{base_tag}";
      args = ["-c" "PATH=/usr/bin:/bin; mkdir -p $out/lib; echo 'base library' > $out/lib/base.txt"]; }};
    lib = derivation {{ name = "libfoo-{version}"; system = "x86_64-linux"; builder = "/bin/sh";
      inherit base;
      args = ["-c" ''PATH=/usr/bin:/bin; set -e; mkdir -p $out/lib $out/share; cd $TMPDIR
        echo '{lib_c}' > foo.c
        gcc -shared -fPIC -Wl,-soname,libfoo.so.1 -Wl,-rpath,$base/lib -o $out/lib/libfoo.so.{version} foo.c
        ln -s libfoo.so.{version} $out/lib/libfoo.so.1; ln -s libfoo.so.1 $out/lib/libfoo.so
        {DATA} {edits} > $out/share/foo.dat'']; }};
    app = derivation {{ name = "app-1.0"; system = "x86_64-linux"; builder = "/bin/sh";
      inherit lib base;
      args = ["-c" ''PATH=/usr/bin:/bin; set -e; mkdir -p $out/bin; cd $TMPDIR
        echo 'int foo_version(void); int main(void) {{ return foo_version() == 0; }}' > app.c
        gcc -o $out/bin/app app.c -L$lib/lib -lfoo -Wl,-rpath,$lib/lib
        printf '#!/bin/sh\\nexport LD_LIBRARY_PATH=%s/lib\\nexec %s/bin/app\\n' $lib $out > $out/bin/app-wrapper
        chmod +x $out/bin/app-wrapper'']; }};
    system = derivation {{ name = "nixos-system-t"; system = "x86_64-linux"; builder = "/bin/sh";
      inherit app lib;
      args = ["-c" ''PATH=/usr/bin:/bin; mkdir -p $out/bin; ln -s $app $out/sw
        printf '#!/bin/sh\\necho "$1 $REUP_TOPLEVEL" >> "$REUP_ROOT/activations"\\n' > $out/bin/switch-to-configuration
        chmod +x $out/bin/switch-to-configuration'']; }};
    """


@dataclass(frozen=True)
class Gens:
    a: str  # libfoo 1.5.5
    b: str  # libfoo 1.5.6 (renamed soname), data edited, app rebuilt
    c: str  # b with a new libbase hash (mass rebuild)


@pytest.fixture(scope="module")
def gens(tmp_path_factory: pytest.TempPathFactory) -> Gens:
    d = tmp_path_factory.mktemp("delta-flake")
    specs = {"a": ("1.5.5", 0, "1"), "b": ("1.5.6", 40, "1"), "c": ("1.5.6", 40, "2")}
    body = "".join(
        f"  nixosConfigurations.{k}.config.system.build.toplevel = let {flake(*v)} in system;\n"
        for k, v in specs.items()
    )
    (d / "flake.nix").write_text("{\n outputs = { self }: {\n" + body + " };\n}\n")
    out = {}
    for k in specs:
        proc = subprocess.run(
            ["nix", "build", "--json", "--no-link", f"path:{d}#nixosConfigurations.{k}.config.system.build.toplevel"],
            env=nix_env(), capture_output=True, text=True, check=True,
        )
        out[k] = json.loads(proc.stdout)[0]["outputs"]["out"]
    return Gens(**out)


@pytest.fixture(scope="module")
def template_a(gens: Gens, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("dev-a") / "root")
    nix_copy(root, [gens.a])
    set_generations(root, [gens.a])
    return root


@pytest.fixture
def root_a(template_a: str, tmp_path: os.PathLike[str]) -> Iterator[str]:
    yield copy_root(template_a, os.path.join(tmp_path, "device"))


def closure(path: str) -> list[str]:
    proc = subprocess.run(["nix-store", "-qR", path], env=nix_env(), capture_output=True, text=True, check=True)
    return proc.stdout.split()


def apply_and_verify(root: str, stream: bytes, target: str) -> None:
    run = receive(root, stream)
    assert run.returncode == 0, run.stderr
    assert run.json()["toplevel"] == target
    assert nix_verify(root, target).returncode == 0
    for p in closure(target):
        assert device_nar_hash(root, p) == host_nar_hash(p), p


def entries(stream: bytes) -> list[tuple[bytes, object]]:
    """(store name, entry) for every entry of a stream."""
    import io

    reader = RecordReader(io.BytesIO(stream))
    out: list[tuple[bytes, object]] = []
    manifest = None
    coder = None
    current = b""
    while True:
        tag, payload = reader.next()
        if tag == T_MANIFEST:  # short ids resolve against this host's store
            manifest = decode_manifest(payload) if reader.version == 1 else decode_manifest_v2(
                payload, lambda: [os.fsencode(n) for n in os.listdir("/nix/store")])
            carried = iter([i for i, p in enumerate(manifest.paths) if p.carried])
        elif tag == T_PATH:
            assert manifest is not None
            coder = EntryCoder(manifest.table, manifest.store_dir, reader.version)
            current = manifest.table[payload[0] if reader.version == 1 else next(carried)]  # v2: manifest order
        elif tag == T_ENTRY:
            assert coder is not None
            out.append((current, coder.decode(payload)))
        elif tag == T_TRAILER:
            return out


def run_encode(tmp_path: os.PathLike[str], held: list[str], target: str, **kw: object) -> tuple[bytes, DeltaStats]:
    out = os.path.join(tmp_path, "stream")
    stats = encode(held, target, out, **kw)  # type: ignore[arg-type]
    with open(out, "rb") as fh:
        return fh.read(), stats


@pytest.mark.parametrize("codec", list(PATCH_CODECS), ids=lambda c: c.name.lower())
def test_each_codec_round_trips(gens: Gens, root_a: str, tmp_path: os.PathLike[str], codec: Codec) -> None:
    stream, stats = run_encode(tmp_path, [gens.a], gens.b, codecs=[codec], workers=0)
    assert stats.ops_by_kind.get(f"patch:{codec.name.lower()}", 0) >= 1, stats.ops_by_kind
    apply_and_verify(root_a, stream, gens.b)


def test_renamed_soname_is_patched_against_its_predecessor(gens: Gens, root_a: str,
                                                           tmp_path: os.PathLike[str]) -> None:
    # Per-file patches (SOLID would code the library in its path's solid frame, whose
    # dictionary is the whole predecessor tree): the pairing names the predecessor.
    stream, stats = run_encode(tmp_path, [gens.a], gens.b, allowed_codecs=list(PATCH_CODECS))
    found = {e.relpath: e for name, e in entries(stream) if name.endswith(b"-libfoo-1.5.6")}  # type: ignore[attr-defined]
    so = found[b"lib/libfoo.so.1.5.6"]
    assert so.method == Method.PATCH and so.source_relpath == b"lib/libfoo.so.1.5.5"  # type: ignore[attr-defined]
    # the wrapper differs from its predecessor only in store hashes: a rewrite, no data
    assert stats.ops_by_kind.get("rewrite", 0) + stats.ops_by_kind.get("mirror", 0) >= 1
    assert stats.stream_bytes < stats.nar_bytes / 10
    apply_and_verify(root_a, stream, gens.b)


def test_mass_rebuild_costs_only_hash_rewrites(gens: Gens, tmp_path: os.PathLike[str]) -> None:
    root = str(tmp_path) + "/dev-b"
    nix_copy(root, [gens.b])
    set_generations(root, [gens.b])
    stream, stats = run_encode(tmp_path, [gens.b], gens.c)
    changed_paths = stats.paths
    assert changed_paths >= 4 and stats.ops_by_kind.get("literal", 0) == 0, stats.ops_by_kind
    assert stats.ops_by_kind.get("mirror", 0) >= 1
    assert stats.stream_bytes <= 100 * stats.files + 64 * changed_paths, stats.to_json()
    apply_and_verify(root, stream, gens.c)


def test_lost_base_file_is_named_and_the_encoder_falls_back(gens: Gens, root_a: str,
                                                            tmp_path: os.PathLike[str]) -> None:
    stream, _ = run_encode(tmp_path, [gens.a], gens.b)
    lib_a = next(p for p in closure(gens.a) if p.endswith("-libfoo-1.5.5"))
    lost = os.path.join(root_a, lib_a.lstrip("/"), "share/foo.dat")
    os.chmod(os.path.dirname(lost), 0o755)
    os.unlink(lost)
    before = snapshot(root_a)
    run = receive(root_a, stream)
    assert_one_line_error(run, 14, lib_a)  # names the base path (or its file) for the fallback
    assert snapshot(root_a) == before
    # the controller's fallback: the same request with the broken path avoided
    stream, stats = run_encode(tmp_path, [gens.a], gens.b, avoid=[lib_a])
    apply_and_verify(root_a, stream, gens.b)


def test_broken_path_needed_by_the_target_is_replaced(gens: Gens, tmp_path: os.PathLike[str]) -> None:
    """A path the target still needs, reported broken, is re-sent and installed over the bad copy."""
    root = str(tmp_path) + "/dev-b"
    nix_copy(root, [gens.b])
    set_generations(root, [gens.b])
    base = next(p for p in closure(gens.b) if p.endswith("-libbase-1.0"))
    broken = os.path.join(root, base.lstrip("/"), "lib/base.txt")
    os.chmod(os.path.dirname(broken), 0o755)
    os.unlink(broken)
    assert nix_verify(root, base).returncode != 0
    stream, _ = run_encode(tmp_path, [gens.b], gens.a, avoid=[base])
    apply_and_verify(root, stream, gens.a)


def test_cli_stats_and_cache(gens: Gens, tmp_path: os.PathLike[str]) -> None:
    cache = os.path.join(tmp_path, "cache")
    argv = [REUP, "delta", "--from", gens.a, "--to", gens.b, "-o", os.path.join(tmp_path, "s"),
            "--stats"]
    first = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
    kinds = first["bytes_by_kind"]
    assert {"manifest", "framing"} <= set(kinds) and any(k.startswith("patch:") or k == "solid" for k in kinds)
    assert first["peak_rss_bytes"] > 0 and first["seconds"] > 0
    assert sum(first["bytes_by_kind"].values()) == first["stream_bytes"]
    cached = [*argv, "--cache", cache]
    miss = json.loads(subprocess.run(cached, capture_output=True, text=True, check=True).stdout)
    entries = {p: (st.st_ino, st.st_size) for p in Path(cache).rglob("*") if (st := p.stat())}
    hit = json.loads(subprocess.run(cached, capture_output=True, text=True, check=True).stdout)
    # Served from the cache: the same file, not encoded and written again (the cache only touches it
    # for its LRU order; the time a hit takes is bench/'s "repeat").
    assert not miss["cached"] and hit["cached"]
    assert {p: (st.st_ino, st.st_size) for p in Path(cache).rglob("*") if (st := p.stat())} == entries
    assert hit["stream_bytes"] == miss["stream_bytes"] == os.path.getsize(os.path.join(tmp_path, "s"))
    shutil.rmtree(cache)


def test_only_codecs_the_device_reports_are_used(gens: Gens, root_a: str, tmp_path: os.PathLike[str]) -> None:
    reported = receive(root_a, None, "--status").json()["codecs"]
    # this venv has every codec, and compiles .pyc recipes with this interpreter
    assert set(reported) == {c.name.lower() for c in Codec} | {STREAM_V2, pyc.identity()}
    device_codecs = [Codec.ZSTD_PREFIX, Codec.BSDIFF4]  # a device without HDiffPatch or LZMA bsdiff
    stream, stats = run_encode(tmp_path, [gens.a], gens.b, allowed_codecs=device_codecs)
    used = {k for k in stats.ops_by_kind if k.startswith("patch:")}
    assert used and used <= {"patch:zstd_prefix", "patch:bsdiff4"}, stats.ops_by_kind
    apply_and_verify(root_a, stream, gens.b)
