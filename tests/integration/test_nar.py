"""reup_receiver.format.nar against Nix itself: NAR hashes of real store paths, and hash notations.

`nar_hash_tree` must equal sha256 of `nix-store --dump` (the receiver verifies
every path with the same hasher, fed from the stream), and `to_nix32` /
`from_nix32` / `parse_hash` must agree with the notations Nix prints. The
golden values were printed by `nix hash to-base32` / `to-sri` (Nix 2.8).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import subprocess

import pytest
from reup_lab.nixenv import nix_env
from reup_receiver.errors import Corrupt
from reup_receiver.format.nar import NarHasher, from_nix32, nar_hash_tree, parse_hash, sri, to_nix32
from support.nixflake import Generations
from support.receiverkit import host_nar_hash

EMPTY = bytes.fromhex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
FOO = bytes.fromhex("b5bb9d8014a0f9b1d61e21e796d78dccdf1352f23cd32812f4850b878ae4944c")


def test_nix32_golden() -> None:
    assert to_nix32(EMPTY) == "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
    assert to_nix32(FOO) == "0k4lwj58f2w5yh92ilrwy9917pycipbrdrr13vbb3yd02j09vfxm"
    sha1_empty = bytes.fromhex("da39a3ee5e6b4b0d3255bfef95601890afd80709")
    assert to_nix32(sha1_empty) == "143xibwh31h9bvxzalr0sjvbbvpa6ffs"  # 20 bytes: a store hash
    assert from_nix32("0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73") == EMPTY
    assert from_nix32("143xibwh31h9bvxzalr0sjvbbvpa6ffs") == sha1_empty


def test_nix32_round_trip_random() -> None:
    rng = random.Random(5)
    for n in (1, 5, 16, 20, 32, 64):
        for _ in range(50):
            digest = rng.randbytes(n)
            text = to_nix32(digest)
            assert len(text) == (n * 8 - 1) // 5 + 1
            assert from_nix32(text) == digest


def test_nix32_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        from_nix32("z" * 52)  # more than 256 bits
    with pytest.raises(ValueError):
        from_nix32("e" * 52)  # 'e' is not in Nix's alphabet


def test_parse_hash_notations() -> None:
    assert parse_hash("sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=") == EMPTY
    assert parse_hash("sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73") == EMPTY
    assert parse_hash("sha256:" + FOO.hex()) == FOO
    assert parse_hash("0k4lwj58f2w5yh92ilrwy9917pycipbrdrr13vbb3yd02j09vfxm") == FOO
    assert sri(FOO) == "sha256-tbudgBSg+bHWHiHnlteNzN8TUvI80ygS9IULh4rklEw="
    with pytest.raises(ValueError):
        parse_hash("sha256-" + base64.b64encode(b"short").decode())


@pytest.mark.slow
def test_nar_hash_tree_equals_nix_dump(gens: Generations) -> None:
    """Directories, symlinks (dangling too), executables, odd names, an ELF library."""
    paths = set()
    for top in (gens.gen1, gens.gen2):
        paths.update(gens.closure(top))
    assert len(paths) >= 8
    for path in sorted(paths):
        digest, size = nar_hash_tree(path)
        assert digest == host_nar_hash(path), path
        dump = subprocess.run(["nix-store", "--dump", path], capture_output=True, check=True)
        assert size == len(dump.stdout)


@pytest.mark.slow
def test_nar_hash_of_file_and_symlink_store_paths(tmp_path: object) -> None:
    """Store paths that are a single file (plain and executable) or a single symlink."""
    d = os.path.join(str(tmp_path), "src")
    os.makedirs(d)
    plain, exe, link = (os.path.join(d, n) for n in ("plain.txt", "run.sh", "link"))
    with open(plain, "w") as fh:
        fh.write("hello\n" * 3)
    with open(exe, "w") as fh:
        fh.write("#!/bin/sh\necho 1234567\n")  # 24 bytes: no NAR padding
    os.chmod(exe, 0o755)
    os.symlink("/nix/store/somewhere else", link)
    for src in (plain, exe, link):
        proc = subprocess.run(["nix-store", "--add", src], capture_output=True, text=True,
                              check=True, env=nix_env())
        path = proc.stdout.strip()
        info = json.loads(subprocess.run(["nix", "path-info", "--json", path], env=nix_env(),
                                         capture_output=True, text=True, check=True).stdout)
        digest, size = nar_hash_tree(path)
        assert digest == host_nar_hash(path) == parse_hash(info[0]["narHash"]), src
        assert size == info[0]["narSize"]


def test_nar_hasher_rejects_bad_order() -> None:
    h = NarHasher()
    h.directory([])
    h.directory([b"b"])
    with pytest.raises(Corrupt):
        h.directory([b"a"])  # after "b": out of order
    h = NarHasher()
    h.directory([])
    h.symlink([b"a"], b"x")
    with pytest.raises(Corrupt):
        h.file_start([b"a", b"b"], False, 0)  # below a symlink
    h = NarHasher()
    h.file_start([], False, 3)
    with pytest.raises(Corrupt):
        h.file_data(b"four")
    h = NarHasher()
    with pytest.raises(Corrupt):
        h.finish()  # no entries at all


def test_nar_hasher_empty_dir_and_file() -> None:
    """Tiny NARs built by hand from the format."""
    def s(b: bytes) -> bytes:
        return len(b).to_bytes(8, "little") + b + b"\0" * (-len(b) % 8)

    h = NarHasher()
    h.directory([])
    nar = s(b"nix-archive-1") + s(b"(") + s(b"type") + s(b"directory") + s(b")")
    assert h.finish() == (hashlib.sha256(nar).digest(), len(nar))
    h = NarHasher()
    h.file_start([], True, 5)
    h.file_data(b"hello")
    nar = (s(b"nix-archive-1") + s(b"(") + s(b"type") + s(b"regular") + s(b"executable")
           + s(b"") + s(b"contents") + s(b"hello") + s(b")"))
    assert h.finish() == (hashlib.sha256(nar).digest(), len(nar))
