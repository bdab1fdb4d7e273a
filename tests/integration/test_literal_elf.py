"""LZMA_ELF end to end with real Nix, gcc and reup-receive: a fresh install whose content is
mostly x86-64 code travels with its executables' RIP-relative operands normalised (literal
codec 2), applies and passes `nix store verify`; a device that does not list `literal_elf`
gets the x86-filter codec (1) and applies it too."""

from __future__ import annotations

import io
import json
import os
import subprocess

import pytest
from reup.delta.encode import encode
from reup_lab.nixenv import nix_env
from reup_receiver.format.literal import LITERAL_LZMA_ELF, LITERAL_LZMA_X86
from reup_receiver.format.manifest2 import decode_manifest_v2
from reup_receiver.format.model import Codec
from reup_receiver.format.wire import T_MANIFEST, RecordReader
from support.receiverkit import device_nar_hash, empty_db_root, host_nar_hash, nix_verify, receive

pytestmark = pytest.mark.slow

# C with many functions that read and write globals (RIP-relative) and call each other.
GEN = (
    "import sys\n"
    "n = 3000\n"
    "out = ['int g%d[4];' % i for i in range(n)]\n"
    "for i in range(n):\n"
    "    call = 'f%d(x + %d)' % (i - 1, i) if i else 'x'\n"
    "    out.append('int f%d(int x) { g%d[x & 3] += x * %d; return g%d[1] + %s; }' % (i, i, i, (i * 7) % n, call))\n"
    "out.append('int main(int c, char **v) { return f%d(c) & 1; }' % (n - 1))\n"
    "open(sys.argv[1], 'w').write('\\n'.join(out))\n"
)

FLAKE = """{
 outputs = { self }: {
  nixosConfigurations.t.config.system.build.toplevel = let
    tool = derivation { name = "elftool-1.0"; system = "x86_64-linux"; builder = "/bin/sh";
      gen = ./gen.py;
      args = ["-c" ''PATH=/usr/bin:/bin; set -e; mkdir -p $out/bin; cd $TMPDIR
        python3 $gen big.c; gcc -O1 -fPIC -pie -o $out/bin/elftool big.c'']; };
    system = derivation { name = "nixos-system-e"; system = "x86_64-linux"; builder = "/bin/sh";
      inherit tool;
      args = ["-c" ''PATH=/usr/bin:/bin; mkdir -p $out/bin; ln -s $tool $out/sw
        printf '#!/bin/sh\\necho "$1 $REUP_TOPLEVEL" >> "$REUP_ROOT/activations"\\n' > $out/bin/switch-to-configuration
        chmod +x $out/bin/switch-to-configuration'']; };
  in system;
 };
}
"""


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("elf-flake")
    (d / "gen.py").write_text(GEN)
    (d / "flake.nix").write_text(FLAKE)
    proc = subprocess.run(
        ["nix", "build", "--json", "--no-link", f"path:{d}#nixosConfigurations.t.config.system.build.toplevel"],
        env=nix_env(), capture_output=True, text=True, check=True)
    out: str = json.loads(proc.stdout)[0]["outputs"]["out"]
    return out


def _literal_codec(stream: bytes) -> int:
    tag, payload = RecordReader(io.BytesIO(stream)).next()
    assert tag == T_MANIFEST
    return decode_manifest_v2(payload, lambda: ()).literal  # a fresh install names no held path


def _closure(path: str) -> list[str]:
    proc = subprocess.run(["nix-store", "-qR", path], env=nix_env(), capture_output=True, text=True, check=True)
    return proc.stdout.split()


@pytest.mark.parametrize("listed", [True, False], ids=["literal_elf", "older"])
def test_fresh_install_applies_and_verifies(target: str, tmp_path: os.PathLike[str], listed: bool) -> None:
    out = os.path.join(tmp_path, "stream")
    allowed = [c for c in Codec if listed or c != Codec.LITERAL_ELF]
    encode([], target, out, workers=0, allowed_codecs=allowed)
    with open(out, "rb") as fh:
        stream = fh.read()
    assert _literal_codec(stream) == (LITERAL_LZMA_ELF if listed else LITERAL_LZMA_X86)
    root = empty_db_root(os.path.join(tmp_path, "device"))
    run = receive(root, stream)
    assert run.returncode == 0, run.stderr
    assert nix_verify(root, target).returncode == 0
    for p in _closure(target):
        assert device_nar_hash(root, p) == host_nar_hash(p), p


def test_elf_codec_is_smaller(target: str, tmp_path: os.PathLike[str]) -> None:
    sizes = []
    for allowed in (list(Codec), [c for c in Codec if c != Codec.LITERAL_ELF]):
        out = os.path.join(tmp_path, "stream")
        encode([], target, out, workers=0, allowed_codecs=allowed)
        sizes.append(os.path.getsize(out))
    assert sizes[0] < sizes[1]
