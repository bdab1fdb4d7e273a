"""Integration: fleet evaluation at scale with real Nix (builder.py, nix.py). Configuration names reach
Nix as data in a file, never as Nix source or one command-line argument: 5,000+ device names, names
holding `${...}`, quotes, backslashes and non-ASCII, chunked evaluation, and a missing Nix binary."""

from __future__ import annotations

import json
import os

from reup.core.model import Device, Fleet
from reup.io.builder import Builder
from reup.io.nix import NixExecutor

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH0d6u0xjBWm0m1u2q5Sg8jzxf9C2ri8Hc3tnrsY+q0a"
ODD = ["plain", "dollar-${builtins.abort \"spliced\"}", 'quo"te', "back\\slash", "ünïcødé-设备", "sp ace"]
FLAKE = """{
  outputs = { self }: {
    nixosConfigurations = builtins.listToAttrs (map (n: {
      name = n;
      value.config.system.build.toplevel = derivation {
        name = "system"; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "echo > $out" ];
        hostname = n;
      };
    }) (builtins.fromJSON (builtins.readFile ./configs.json)));
  };
}
"""


def _flake(tmp: str, configs: list[str]) -> str:
    os.makedirs(tmp, exist_ok=True)
    with open(os.path.join(tmp, "flake.nix"), "w", encoding="utf-8") as f:
        f.write(FLAKE)
    with open(os.path.join(tmp, "configs.json"), "w", encoding="utf-8") as f:
        json.dump(configs, f, ensure_ascii=False)
    return f"path:{tmp}"


def _fleet(assign: dict[str, str]) -> Fleet:
    return Fleet(devices={n: Device(n, "h", KEY, config=c) for n, c in assign.items()})


def test_evaluate_5000_devices_with_odd_config_names(tmp_path: os.PathLike[str]) -> None:
    unique = [f"own-{i:03d}" for i in range(200)]  # a slice of the fleet with its own system each
    flake = _flake(os.path.join(tmp_path, "flake"), ODD + unique)
    assign = {f"device-{i:05d}-with-a-longer-name": ODD[i % len(ODD)] for i in range(5200)}
    assign.update({f"unique-{c}": c for c in unique})
    assign["lost"] = "no-such-configuration"
    builder = Builder(NixExecutor(options={"sandbox": "false", "substituters": ""}), chunk=150)
    targets = {t.device: t for t in builder.evaluate(flake, _fleet(assign), "c1")}
    assert len(targets) == len(assign)
    by_config: dict[str, set[str | None]] = {}
    for name, config in assign.items():
        by_config.setdefault(config, set()).add(targets[name].toplevel)
    for config in ODD + unique:
        tops = by_config[config]
        assert len(tops) == 1 and None not in tops, config
    assert len({next(iter(by_config[c])) for c in ODD + unique}) == len(ODD) + len(unique)
    lost = targets["lost"]
    assert lost.toplevel is None and "no-such-configuration" in (lost.error or "") and "evaluation failed" in (lost.error or "")


def test_missing_nix_is_an_error_not_a_crash(tmp_path: os.PathLike[str]) -> None:
    flake = _flake(os.path.join(tmp_path, "flake"), ["a"])
    nix = NixExecutor(env={"PATH": os.path.join(str(tmp_path), "empty")})
    targets = Builder(nix).evaluate(flake, _fleet({"d": "a"}), "c1")
    assert targets[0].toplevel is None and "cannot run nix" in (targets[0].error or "")


def test_build_many_in_one_call_and_errors_one_by_one(tmp_path: os.PathLike[str]) -> None:
    names = [f"host-{i}" for i in range(6)]
    flake = _flake(os.path.join(tmp_path, "flake"), names)
    builder = Builder(NixExecutor(options={"sandbox": "false", "substituters": ""}))
    targets = builder.evaluate(flake, _fleet({n: n for n in names}), "c1")
    drvs = [t.drv_path or "" for t in targets]
    built = builder.build_many(drvs)
    assert {d: built[d] for d in drvs} == {t.drv_path: t.toplevel for t in targets}
    assert all(os.path.exists(t.toplevel or "") for t in targets)
    missing = "/nix/store/00000000000000000000000000000000-missing.drv"
    again = builder.build_many([*drvs[:2], missing])  # one broken: the batch fails, each gets its own answer
    assert again[drvs[0]] == targets[0].toplevel and again[drvs[1]] == targets[1].toplevel
    assert "build failed" in str(again[missing])
