"""`reup init DIR [--offline]`: the template copied into a new git repo; the offline flavor builds with
real Nix (no inputs) into systems whose programs run; a non-empty directory is refused."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from reup.config.fleet_toml import parse_fleet
from reup.core.errors import ConfigError
from reup_lab.nixenv import nix_env
from support.fleetkeys import with_real_keys
from support.sshd import reup_bin


def init(dest: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([reup_bin(), "init", dest, *args], capture_output=True, text=True, timeout=60, check=False)


def tracked(repo: str) -> set[str]:
    out = subprocess.run(["git", "-C", repo, "ls-files"], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_init_nixos_flavor(tmp_path: os.PathLike[str]) -> None:
    dest = os.path.join(tmp_path, "fleet")
    r = init(dest)
    assert r.returncode == 0, r.stderr
    files = tracked(dest)
    assert {"flake.nix", "fleet.toml", "README.md", "modules/minify.nix", "modules/receiver.nix"} <= files
    assert not any(f.startswith("offline/") for f in files)
    with open(os.path.join(dest, "fleet.toml"), encoding="utf-8") as f:
        text = f.read()
    with pytest.raises(ConfigError, match=r"devices\.pi-01\.host_key: .*placeholder.*ssh-keyscan"):
        parse_fleet(text)  # refused until the team puts in the devices' real keys
    fleet = parse_fleet(with_real_keys(text))
    assert {d.config for d in fleet.devices.values()} == {"board", "pi"}
    # Refused: the directory is not empty now; nothing in it changes.
    again = init(dest)
    assert again.returncode == 2 and "not empty" in again.stderr
    assert tracked(dest) == files


def test_init_offline_flavor_builds(tmp_path: os.PathLike[str]) -> None:
    dest = os.path.join(tmp_path, "fleet")
    r = init(dest, "--offline")
    assert r.returncode == 0, r.stderr
    assert {"flake.nix", "fleet.toml", "hosts/pi.nix", "hosts/board.nix", "src/sensord.c"} <= tracked(dest)
    with open(os.path.join(dest, "fleet.toml"), encoding="utf-8") as f:
        fleet = parse_fleet(with_real_keys(f.read()))
    env = nix_env()
    attrs = [f".#nixosConfigurations.{c}.config.system.build.toplevel" for c in sorted({d.config for d in
                                                                                          fleet.devices.values()})]
    built = subprocess.run(["nix", "build", "--json", "--no-link", *attrs], cwd=dest, env=env, capture_output=True,
                           text=True, timeout=300, check=False)
    assert built.returncode == 0, built.stderr
    for out in (b["outputs"]["out"] for b in json.loads(built.stdout)):
        run = subprocess.run([os.path.join(out, "sw/bin/sensord"), "--self-test"], capture_output=True, text=True,
                             check=False)
        assert run.returncode == 0 and "self-test ok" in run.stdout, run.stderr
        assert os.access(os.path.join(out, "bin/switch-to-configuration"), os.X_OK)
    # The pi's sensord is an ELF program whose RPATH names libsensor's store path, a reference Nix sees.
    pi = json.loads(built.stdout)[-1]["outputs"]["out"]
    refs = subprocess.run(["nix-store", "-qR", pi], capture_output=True, text=True, check=True).stdout.split()
    assert any(p.endswith("-libsensor-2.1") for p in refs) and any("-sensord-1.4.0" in p for p in refs)
