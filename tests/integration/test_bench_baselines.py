"""Bench baselines on small trees: (b) round-trips through bsdiff4, (c) through zstd --patch-from."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

from bench import baseline_files, baselines, storefs

H1, H2, H3, H4 = ("a" * 32, "b" * 32, "c" * 32, "d" * 32)


def _write(path: Path, data: bytes, executable: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, 0o755 if executable else 0o644)


@pytest.fixture
def trees(tmp_path: Path) -> tuple[list[str], list[str]]:
    rng = random.Random(3)
    blob = bytes(rng.getrandbits(8) for _ in range(40_000))
    store = tmp_path / "store"
    old = store / f"{H1}-app-1.0"
    _write(old / "bin/app", blob, executable=True)
    _write(old / "share/doc/README", b"read me\n" * 50)
    _write(old / "lib/libx.so.1", b"\x7fELF" + blob[:5000])
    (old / "lib/libx.so").symlink_to("libx.so.1")
    new = store / f"{H2}-app-1.1"
    _write(new / "bin/app", blob[:20_000] + b"patched!" + blob[20_008:], executable=True)
    _write(new / "share/doc/README", b"read me\n" * 50)  # dedup against the held tree
    _write(new / "share/doc/NEWS", b"1.1: faster\n")  # literal
    _write(new / "lib/libx.so.1", b"\x7fELF" + blob[:5000], executable=True)  # exec bit differs
    (new / "lib/libx.so").symlink_to("libx.so.1")
    (new / "var/empty").mkdir(parents=True)
    other = store / f"{H3}-other-2.0"
    _write(other / "NEWS", b"1.1: faster\n")  # dedup within the stream
    return [str(old)], [str(new), str(other)]


def _tree(root: str) -> list[tuple[str, str, bool, str, bytes]]:
    out = []
    for e in storefs.walk(root):
        data = Path(storefs.join(root, e.rel)).read_bytes() if e.kind == "f" else b""
        out.append((e.rel, e.kind, e.executable, e.target, data))
    return out


def test_files_baseline_round_trips(trees: tuple[list[str], list[str]], tmp_path: Path) -> None:
    held, new = trees
    stream = tmp_path / "b.zst"
    with open(stream, "wb") as f:
        st = baseline_files.encode(held, new, f)
    assert st.bytes == stream.stat().st_size > 0
    assert st.ops["bsdiff"] == 2 and st.ops["literal"] == 1 and st.ops["dedup"] == 2
    dest = tmp_path / "out"
    with open(stream, "rb") as f:
        made = baseline_files.decode(f, {p: p for p in held}, str(dest))
    assert [os.path.basename(m) for m in made] == sorted(os.path.basename(p) for p in new)
    for p in new:
        assert _tree(str(dest / os.path.basename(p))) == _tree(p)


def test_pairing_by_name_then_unique_package_name() -> None:
    old = [f"/nix/store/{H1}-libfoo-1.5.5", f"/nix/store/{H2}-etc", f"/nix/store/{H3}-py-a-1", f"/nix/store/{H4}-py-a-2"]
    new = [f"/nix/store/{H4}-libfoo-1.5.6", f"/nix/store/{H3}-etc", f"/nix/store/{H2}-py-a-3", f"/nix/store/{H1}-x-1"]
    pairs = baseline_files.pair_paths(new, old)
    assert pairs == {new[0]: old[0], new[1]: old[1]}  # py-a is ambiguous, x has no partner


def test_patch_from_baseline_decompresses_to_the_new_tar(trees: tuple[list[str], list[str]], tmp_path: Path) -> None:
    held, new = trees
    work = tmp_path / "c"
    work.mkdir()
    old_tar, new_tar, out = work / "old.tar", work / "new.tar", work / "new.tar.zst"
    subprocess.run(baselines.tar_cmd(held, old_tar), check=True)
    subprocess.run(baselines.tar_cmd(new, new_tar), check=True)
    subprocess.run(baselines.zstd_patch_cmd(new_tar, old_tar, out), check=True)
    back = work / "back.tar"
    subprocess.run(["zstd", "-d", "-q", "--long=27", f"--patch-from={old_tar}", str(out), "-o", str(back)], check=True)
    assert back.read_bytes() == new_tar.read_bytes()
    (tmp_path / "c2").mkdir()
    res = baselines.baseline_patch_from(held, new, tmp_path / "c2")
    assert 0 < res.bytes < new_tar.stat().st_size


def test_tar_of_nothing_is_valid(tmp_path: Path) -> None:
    argv = baselines.tar_cmd([], tmp_path / "empty.tar")
    assert argv[-1] == "--files-from=/dev/null"
    assert baselines.zstd_patch_cmd(Path("n.tar"), None, Path("o")) == ["zstd", "-19", "--long=27", "-q", "-f", "n.tar", "-o", "o"]


def test_nars_xz_baseline_is_the_compressed_nars(trees: tuple[list[str], list[str]], tmp_path: Path) -> None:
    _, new = trees
    res = baselines.baseline_nars_xz(new, tmp_path)
    nars = b"".join(subprocess.run(["nix-store", "--dump", p], capture_output=True, check=True).stdout
                    for p in sorted(new))
    assert res.method == "nars+xz-9e" and res.detail["nar_bytes"] == len(nars)
    assert res.bytes == len(subprocess.run(["xz", "-9e", "-T1", "-c"], input=nars, capture_output=True,
                                           check=True).stdout)
