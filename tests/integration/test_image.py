"""The controller's OCI image (flake output `reup-image`) against the chart that runs it, offline.

No nixpkgs offline, so the flake is evaluated with a stub nixpkgs whose `dockerTools` returns its
arguments: the image's name and tag must be the chart's default image, and the chart's container
(no `command`, so the image's entrypoint `reup` runs) must pass `reup`'s own argument parser, for
one replica and for shards. The seed-nix init container runs `nix copy` on the same image.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import yaml
from reup.cli.main import build_parser
from reup.cli.run import cmd_run
from test_chart import CHART, chart, container, one, render
from test_nix_files import nix_eval, nix_path

STUB = """{
  lib.genAttrs = names: f: builtins.listToAttrs (map (name: { inherit name; value = f name; }) names);
  legacyPackages = builtins.listToAttrs (map (system: { name = system; value = {
    inherit system;
    lib.makeBinPath = _: "/bin";
    callPackage = _: _: { outPath = "/nix/store/r-reup-receiver"; };
    python3Packages.buildPythonApplication = a: a // { outPath = "/nix/store/c-reup-" + a.version; };
    dockerTools = { buildLayeredImage = a: a; fakeNss = "fakeNss"; };
    cacert = { outPath = "/nix/store/k-cacert"; };
  }; }) [ "x86_64-linux" "aarch64-linux" ]);
}"""


def image() -> dict[str, Any]:
    r: dict[str, Any] = nix_eval(f"""
      let
        flake = import {nix_path("flake.nix")};
        self = flake.outputs {{ inherit self; nixpkgs = {STUB}; }};
        i = self.packages.x86_64-linux.reup-image;
      in {{ inherit (i) name tag includeNixDB; inherit (i.config) Entrypoint Cmd Env; }}""")
    return r


def test_image_is_the_charts_default() -> None:
    img = image()
    with open(os.path.join(CHART, "values.yaml"), encoding="utf-8") as f:
        values = yaml.safe_load(f)
    assert (img["name"], img["tag"]) == (values["image"]["repository"], values["image"]["tag"])
    assert img["Entrypoint"] == ["/nix/store/c-reup-0.1.0/bin/reup"] and img["includeNixDB"] is True
    assert any(e.startswith("SSL_CERT_FILE=/nix/store/k-cacert/") for e in img["Env"])  # https:// fetches


@pytest.mark.parametrize("replicas", [1, 3])
def test_chart_args_are_a_reup_command_line(replicas: int) -> None:
    img = image()
    c = container(render({"replicas": replicas}))
    assert "command" not in c  # the image's entrypoint runs
    args = [a.replace("$(REUP_SHARD_INDEX)", "0") for a in c["args"]]
    parsed = build_parser().parse_args(args)
    assert parsed.func is cmd_run and parsed.config == "/etc/reup/reup.toml"
    if replicas == 1:
        assert img["Cmd"] == c["args"]  # the image alone runs what the chart runs


def test_seed_init_container_uses_the_image() -> None:
    docs = render({})
    pod = one(docs, "StatefulSet")["spec"]["template"]["spec"]
    (seed,) = pod["initContainers"]
    assert seed["image"] == container(docs)["image"] and seed["command"][:2] == ["nix", "copy"]
    assert {m["name"]: m["mountPath"] for m in seed["volumeMounts"]} == {"nix": "/seed/nix"}
    assert "local?root=/seed" in seed["command"]
    no_seed = one(render({"persistence": {"nix": {"seed": False}}}), "StatefulSet")["spec"]["template"]["spec"]
    assert "initContainers" not in no_seed
    assert chart().values({})["persistence"]["nix"]["seed"] is True


def test_credential_file_names_agree_with_the_chart_and_the_nixos_module() -> None:
    import re

    from reup.config.reup_toml import CREDENTIAL_FILES
    with open(os.path.join(CHART, "..", "..", "flake.nix"), encoding="utf-8") as f:
        (names,) = re.findall(r"gitCredentialNames = \[([^\]]*)\]", f.read())
    assert tuple(re.findall(r'"([a-z_]+)"', names)) == CREDENTIAL_FILES
    docs = render({"gitCredentials": {"sshKey": "k", "knownHosts": "h k", "username": "u", "token": "t",
                                      "caFile": "c"}})
    (secret,) = [d for d in docs["Secret"] if d["metadata"]["name"].endswith("-git")]
    assert set(secret["data"]) | {"password"} == set(CREDENTIAL_FILES)
