"""Fresh installs of per-device systems with the controller's literal memo, real Nix and
reup-receive: every device's system is its own (its hostname in the toplevel) over a shared base.
From the second device on, the shared paths go first as groups of their own; from the third, their
compressed bytes come from the memo. Each stream applies on an empty device root and passes
`nix store verify`, and a stream made with memo hits is byte for byte the stream made by
compressing again."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from reup.delta.encode import encode
from reup.delta.literalmemo import LiteralMemo
from reup_lab.nixenv import nix_env
from support.receiverkit import device_nar_hash, empty_db_root, host_nar_hash, nix_verify, receive

pytestmark = pytest.mark.slow

FLAKE = r'''{
  outputs = { self }: let
    system = "x86_64-linux";
    base = derivation {
      name = "memo-base-1"; builder = "/bin/sh"; inherit system;
      args = [ "-c" "PATH=/usr/bin:/bin; mkdir -p $out/lib; seq 1 9000 | sed 's/$/ memo base/' > $out/lib/base.txt" ];
    };
    mk = name: derivation {
      name = "nixos-system-memo-${name}"; builder = "/bin/sh"; inherit system base;
      args = [ "-c" "PATH=/usr/bin:/bin; mkdir -p $out/bin $out/etc; ln -s $base $out/base; echo ${name} > $out/etc/hostname; printf '#!/bin/sh\\n' > $out/bin/switch-to-configuration; chmod +x $out/bin/switch-to-configuration" ];
    };
  in {
    nixosConfigurations = builtins.listToAttrs (map (n: { name = n; value.config.system.build.toplevel = mk n; })
      [ "a" "b" "c" ]);
  };
}
'''


@pytest.fixture(scope="module")
def systems(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    d = tmp_path_factory.mktemp("memo-flake")
    (d / "flake.nix").write_text(FLAKE)
    attrs = [f"path:{d}#nixosConfigurations.{n}.config.system.build.toplevel" for n in "abc"]
    proc = subprocess.run(["nix", "build", "--json", "--no-link", *attrs], env=nix_env(), capture_output=True,
                          text=True, check=True)
    return [r["outputs"]["out"] for r in json.loads(proc.stdout)]


def _closure(path: str) -> list[str]:
    proc = subprocess.run(["nix-store", "-qR", path], env=nix_env(), capture_output=True, text=True, check=True)
    return proc.stdout.split()


def test_fresh_streams_share_the_base_and_apply(systems: list[str], tmp_path: os.PathLike[str]) -> None:
    memo = LiteralMemo()
    streams = []
    for i, target in enumerate(systems):
        out = os.path.join(tmp_path, f"stream-{i}")
        encode([], target, out, workers=0, literal_memo=memo)
        with open(out, "rb") as fh:
            streams.append(fh.read())
        root = empty_db_root(os.path.join(tmp_path, f"device-{i}"))
        run = receive(root, streams[-1])
        assert run.returncode == 0, run.stderr
        assert nix_verify(root, target).returncode == 0
        for p in _closure(target):
            assert device_nar_hash(root, p) == host_nar_hash(p), p
        assert memo.seen(target)
    assert (memo.hits, memo.misses) == (1, 1)  # the second device compressed the base's group, the third reused it

    again = LiteralMemo()  # the same paths carried before, nothing compressed yet
    again.note(p for t in systems[:2] for p in _closure(t))
    out = os.path.join(tmp_path, "stream-again")
    encode([], systems[2], out, workers=0, literal_memo=again)
    with open(out, "rb") as fh:
        assert fh.read() == streams[2]
    assert (again.hits, again.misses) == (0, 1)
