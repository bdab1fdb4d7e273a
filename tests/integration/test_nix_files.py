"""The repository's Nix files, checked with the real (offline) Nix and no nixpkgs.

Every `.nix` file parses (`nix-instantiate --parse`). What evaluates without nixpkgs is evaluated
(`nix-instantiate --eval --strict --json`): the minify helpers of fleet-repo-template/modules/lib.nix
on the template's hosts/board.lsmod and on /proc/modules text; each flake's inputs against the
arguments of its `outputs`; the arguments of the NixOS module files; the top-level flake's outputs
and the template flake's nixosConfigurations with stub inputs (nixosSystem returns its arguments),
against the devices of the template's fleet.toml as the controller parses it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from typing import Any

import pytest
from reup.config.fleet_toml import parse_fleet
from reup_lab.nixenv import nix_env
from support.fleetkeys import with_real_keys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TEMPLATE = os.path.join(ROOT, "fleet-repo-template")
BOARD_LSMOD = os.path.join(TEMPLATE, "hosts", "board.lsmod")
SKIP_DIRS = {".venv", "node_modules", "__pycache__", "build"}

# Flags of nixpkgs' systemd package (pkgs/os-specific/linux/systemd/default.nix, nixos-24.11 and
# 25.05) that reup.minify.systemd may pass to `pkgs.systemd.override`.
SYSTEMD_FLAGS = {
    "withAcl", "withAnalyze", "withApparmor", "withAudit", "withBootloader", "withCompression",
    "withCoredump", "withCryptsetup", "withRepart", "withDocumentation", "withEfi", "withFido2",
    "withFirstboot", "withHomed", "withHostnamed", "withHwdb", "withImportd", "withKmod",
    "withLibBPF", "withLibidn2", "withLocaled", "withLogind", "withMachined", "withNetworkd",
    "withNss", "withOomd", "withPam", "withPasswordQuality", "withPCRE2", "withPolkit",
    "withPortabled", "withQrencode", "withRemote", "withResolved", "withShellCompletions",
    "withSysusers", "withSysupdate", "withTimedated", "withTimesyncd", "withTpm2Tss", "withUkify",
    "withUserDb", "withUtmp", "withVmspawn", "withKernelInstall", "withLogTrace",
}


def nix_files() -> list[str]:
    """Every .nix file of the work tree (relative paths) that git does not ignore: not the copies
    a wheel build leaves in controller/build/, which made the count differ from run to run."""
    proc = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", "*.nix"],
                          cwd=ROOT, capture_output=True, check=False)
    if proc.returncode == 0:
        return sorted({f for f in proc.stdout.decode().split("\0") if f and os.path.exists(os.path.join(ROOT, f))})
    found = []  # not a git checkout: walk it, hidden directories, .venv and build outputs skipped
    for top, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        found += [os.path.relpath(os.path.join(top, f), ROOT) for f in files if f.endswith(".nix")]
    return sorted(found)


def nix_eval(expr: str) -> Any:
    proc = subprocess.run(["nix-instantiate", "--eval", "--strict", "--json", "-E", expr], cwd=ROOT,
                          env=nix_env(), capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def nix_path(*parts: str) -> str:
    """A Nix path expression for a file of the repository (any characters in ROOT)."""
    return f"(/. + {json.dumps(os.path.join(ROOT, *parts), ensure_ascii=False)})"


def nix_string(text: str) -> str:
    """A Nix string literal holding `text` (JSON escapes are Nix escapes, `$` aside)."""
    return json.dumps(text, ensure_ascii=False).replace("${", "\\${")


def lsmod_names(text: str) -> list[str]:
    """What the modules' parser must find, computed independently: the first column of each line."""
    names = set()
    for line in text.splitlines():
        words = line.split()
        if words and not words[0].startswith("#") and words[0] != "Module":
            names.add(words[0].replace("-", "_"))
    return sorted(names)


FILES = nix_files()
LIB = nix_path("fleet-repo-template", "modules", "lib.nix")


def test_the_nix_files_are_found() -> None:
    assert {"flake.nix", "fleet-repo-template/flake.nix", "fleet-repo-template/modules/lib.nix",
            "fleet-repo-template/modules/minify.nix", "fleet-repo-template/modules/receiver.nix",
            "fleet-repo-template/hosts/common.nix", "fleet-repo-template/hosts/board.nix",
            "fleet-repo-template/hosts/pi.nix"} <= set(FILES)


@pytest.mark.parametrize("path", FILES)
def test_nix_file_parses(path: str) -> None:
    proc = subprocess.run(["nix-instantiate", "--parse", path], cwd=ROOT, env=nix_env(),
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr


def test_lsmod_golden_modules_and_kernel_symbols() -> None:
    with open(BOARD_LSMOD, encoding="utf-8") as f:
        text = f.read()
    r = nix_eval(f"""
      let l = import {LIB}; modules = l.parseLsmod (builtins.readFile {nix_path("fleet-repo-template", "hosts", "board.lsmod")});
          c = l.configFor l.moduleConfig modules;
      in {{ inherit modules; inherit (c) mapped unmapped settings;
           merged = l.mergeSettings [ l.nixosBaseline c.settings ]; }}""")
    expected = lsmod_names(text)
    assert r["modules"] == expected and len(expected) == 61
    assert {"iTCO_wdt", "igb", "nvme", "ext4", "overlay", "erofs", "nf_tables"} <= set(expected)
    # Every module the board loads is known to the table; helper modules add no symbol of their own.
    assert r["unmapped"] == [] and r["mapped"] == expected
    s = r["settings"]
    for symbol, value in {"IGB": "m", "NET_VENDOR_INTEL": "y", "ETHERNET": "y", "NETDEVICES": "y",
                          "BLK_DEV_NVME": "m", "EXT4_FS": "m", "VFAT_FS": "m", "NLS_CODEPAGE_437": "m",
                          "ITCO_WDT": "m", "WATCHDOG": "y", "USB_XHCI_PCI": "m", "NF_TABLES": "m",
                          "NETFILTER": "y", "IP6_NF_MATCH_RPFILTER": "m", "SENSORS_CORETEMP": "m",
                          "HWMON": "y", "TCG_CRB": "m", "EROFS_FS": "m", "OVERLAY_FS": "m"}.items():
        assert s.get(symbol) == value, symbol
    assert not {"JBD2", "FS_MBCACHE", "NVME_CORE", "USB_COMMON"} & set(s)
    assert set(s.values()) <= {"y", "m"}
    # The NixOS baseline is built in: "y" beats the table's "m".
    merged = r["merged"]
    assert merged["EROFS_FS"] == merged["OVERLAY_FS"] == merged["BLK_DEV_LOOP"] == "y"
    assert merged["IGB"] == "m" and merged["DEVTMPFS"] == merged["CGROUPS"] == "y"


def test_proc_modules_format_and_unknown_modules() -> None:
    proc_modules = ("nvme 57344 2 - Live 0x0000000000000000\n"
                    "reset-raspberrypi 12288 0 - Live 0x0000000000000000\n"
                    "frobnicator 4096 0 - Live 0x0000000000000000 (OE)\n"
                    "nvme_core 204800 3 nvme, Live 0x0000000000000000\n\n")
    r = nix_eval(f"""
      let l = import {LIB}; modules = l.parseLsmod {nix_string(proc_modules)};
      in {{ inherit modules; c = l.configFor l.moduleConfig (modules ++ [ "usb-storage" ]); }}""")
    assert r["modules"] == ["frobnicator", "nvme", "nvme_core", "reset_raspberrypi"]
    assert r["c"]["unmapped"] == ["frobnicator"]
    assert r["c"]["mapped"] == ["nvme", "nvme_core", "reset_raspberrypi", "usb_storage"]
    assert r["c"]["settings"] == {"BLK_DEV_NVME": "m", "RESET_RASPBERRYPI": "m", "USB_STORAGE": "m"}


def test_merge_settings_prefers_built_in() -> None:
    r = nix_eval(f"""
      let l = import {LIB}; in [
        (l.mergeSettings [ {{ A = "m"; B = "y"; C = "64"; }} {{ A = "y"; B = "m"; C = "32"; D = "n"; }} ])
        (l.mergeSettings [ ])
      ]""")
    assert r == [{"A": "y", "B": "y", "C": "64", "D": "n"}, {}]


def test_small_systemd_flags_exist_and_turn_parts_off() -> None:
    flags = nix_eval(f"(import {LIB}).smallSystemd")
    assert flags and set(flags) <= SYSTEMD_FLAGS and not any(flags.values())
    # The initrd and the x86 board's systemd-boot need these.
    assert not {"withEfi", "withBootloader", "withCryptsetup", "withSysusers", "withNetworkd"} & set(flags)


@pytest.mark.parametrize("path", [f for f in FILES if os.path.basename(f) == "flake.nix"])
def test_flake_outputs_take_the_declared_inputs(path: str) -> None:
    r = nix_eval(f"""
      let f = import {nix_path(path)}; in {{
        description = f.description or null;
        inputs = builtins.attrNames (f.inputs or {{ }});
        args = builtins.functionArgs f.outputs;
      }}""")
    assert r["description"] is None or isinstance(r["description"], str)
    assert set(r["args"]) == {"self", *r["inputs"]}, path
    assert not any(r["args"].values()), "inputs are not optional"


def test_flake_inputs() -> None:
    r = nix_eval(f"""
      let top = import {nix_path("flake.nix")}; template = import {nix_path("fleet-repo-template", "flake.nix")}; in {{
        top = top.inputs; template = template.inputs;
        descriptions = [ top.description template.description ];
      }}""")
    assert all(d.strip() for d in r["descriptions"])
    assert r["top"]["nixpkgs"]["url"] == r["template"]["nixpkgs"]["url"] == "github:NixOS/nixpkgs/nixos-24.11"
    assert set(r["template"]) == {"nixpkgs", "reup"}
    assert r["template"]["reup"]["inputs"]["nixpkgs"]["follows"] == "nixpkgs"


@pytest.mark.parametrize("path", [
    "fleet-repo-template/modules/minify.nix", "fleet-repo-template/modules/receiver.nix",
    "fleet-repo-template/hosts/common.nix", "fleet-repo-template/hosts/board.nix",
    "fleet-repo-template/hosts/pi.nix", "fleet-repo-template/hosts/pi-sd-image.nix",
])
def test_module_files_are_nixos_modules(path: str) -> None:
    args = nix_eval(f"builtins.functionArgs (import {nix_path(path)})")
    assert {"config", "lib", "pkgs"} <= set(args), path


def test_receiver_package_is_callable() -> None:
    args = nix_eval(f"builtins.functionArgs (import {nix_path('fleet-repo-template', 'modules', 'receiver-package.nix')})")
    assert args == {"lib": False, "python3Packages": False, "src": False, "version": True}


STUB_NIXPKGS = """{
  lib.genAttrs = names: f: builtins.listToAttrs (map (name: { inherit name; value = f name; }) names);
  lib.nixosSystem = args: args // { extendModules = more: { config.system.build.sdImage = more; }; };
  legacyPackages = { x86_64-linux = { }; aarch64-linux = { }; };
}"""


def test_top_level_flake_outputs() -> None:
    r = nix_eval(f"""
      let
        flake = import {nix_path("flake.nix")};
        self = flake.outputs {{ inherit self; nixpkgs = {STUB_NIXPKGS}; }};
        names = builtins.mapAttrs (_: builtins.attrNames);
        receiver = self.nixosModules.receiver {{ lib.mkDefault = x: x; pkgs.stdenv.hostPlatform.system = "x86_64-linux"; }};
      in {{
        outputs = builtins.attrNames self;
        packages = names self.packages; apps = names self.apps; checks = names self.checks;
        devShells = names self.devShells;
        modules = builtins.attrNames self.nixosModules;
        controllerArgs = builtins.functionArgs self.nixosModules.controller;
        receiverImports = map toString receiver.imports;
        minify = toString self.nixosModules.minify;
      }}""")
    systems = ["aarch64-linux", "x86_64-linux"]
    assert {"packages", "apps", "nixosModules", "devShells", "checks"} <= set(r["outputs"])
    assert r["packages"] == {s: ["default", "reup", "reup-image", "reup-receiver"] for s in systems}
    assert r["apps"] == {s: ["default", "reup", "reup-receive"] for s in systems}
    assert r["devShells"] == {s: ["default"] for s in systems}
    assert r["checks"] == {s: ["python-tests", "reup", "reup-receiver"] for s in systems}
    assert r["modules"] == ["controller", "minify", "receiver"]
    assert {"config", "lib", "pkgs"} <= set(r["controllerArgs"])
    # One source: the flake's device modules are the fleet template's files.
    assert r["receiverImports"] == [os.path.join(TEMPLATE, "modules", "receiver.nix")]
    assert r["minify"] == os.path.join(TEMPLATE, "modules", "minify.nix")


def test_fleet_devices_name_template_configurations() -> None:
    with open(os.path.join(TEMPLATE, "fleet.toml"), encoding="utf-8") as f:
        fleet = parse_fleet(with_real_keys(f.read()))
    r = nix_eval(f"""
      let
        flake = import {nix_path("fleet-repo-template", "flake.nix")};
        reup = {{ packages = builtins.mapAttrs (system: _: {{ reup-receiver = "reup-receiver-" + system; }})
                                               {{ x86_64-linux = 1; aarch64-linux = 1; }}; }};
        self = flake.outputs {{ inherit self reup; nixpkgs = {STUB_NIXPKGS}; }};
        describe = m: if builtins.isPath m then {{ path = toString m; }}
                      else {{ system = m.nixpkgs.hostPlatform; receiver = m.reup.receiver.package; }};
      in {{
        configs = builtins.mapAttrs (_: c: map describe c.modules) self.nixosConfigurations;
        image = map describe self.packages.aarch64-linux.pi-sd-image.modules;
      }}""")
    configs: dict[str, list[dict[str, str]]] = r["configs"]
    assert {d.config for d in fleet.devices.values()} == set(configs) == {"board", "pi"}
    assert fleet.devices["board-01"].config == "board" and fleet.devices["pi-01"].config == "pi"
    assert set(fleet.rollout.waves) == {d.wave for d in fleet.devices.values()}
    for name, modules in configs.items():
        paths = [m["path"] for m in modules if "path" in m]
        inline = [m for m in modules if "path" not in m]
        rel = [os.path.relpath(p, TEMPLATE) for p in paths]
        assert rel == ["modules/minify.nix", "modules/receiver.nix", "hosts/common.nix", f"hosts/{name}.nix"]
        assert all(os.path.isfile(p) for p in paths)
        system = {"board": "x86_64-linux", "pi": "aarch64-linux"}[name]
        assert inline == [{"system": system, "receiver": f"reup-receiver-{system}"}]
    assert [os.path.relpath(m["path"], TEMPLATE) for m in r["image"]] == ["hosts/pi-sd-image.nix"]


def test_flake_check_runs_existing_test_files() -> None:
    """`checks.python-tests` names its test files: each must exist (a renamed file would vanish from it)."""
    with open(os.path.join(ROOT, "flake.nix"), encoding="utf-8") as f:
        names = re.findall(r'"(tests/[a-z_/]+\.py)"', f.read())
    assert len(names) >= 5
    for name in names:
        assert os.path.isfile(os.path.join(ROOT, name)), name
