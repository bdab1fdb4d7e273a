"""A self-contained example fleet repo: flake.nix (no inputs, no nixpkgs) + fleet.toml, in git.

Used by `reup demo` (demo.py) and, through the lab (lab.py), the controller's
integration and end-to-end tests. Each configuration's toplevel is a plain
`derivation` (builder /bin/sh) with a shared `base` dependency, some data and a
`bin/switch-to-configuration` that appends "<action> <config> <version>" to
`$REUP_ROOT/activations`; a configuration can be made to throw at evaluation
("!eval"), to fail its build (version ending in "!build"), to fail its
activation ("!fail") or to activate slowly ("!slow", 3 s; "!timed", 1 s between "begin/end <epoch>"
lines in `$REUP_ROOT/timeline`).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping

GIT_ENV = {
    "GIT_AUTHOR_NAME": "reup demo", "GIT_AUTHOR_EMAIL": "demo@reup.invalid",
    "GIT_COMMITTER_NAME": "reup demo", "GIT_COMMITTER_EMAIL": "demo@reup.invalid",
}

_HEAD = r'''{
  description = "reup example fleet";
  outputs = { self }: let
    system = "x86_64-linux";
    base = derivation {
      name = "base-1"; builder = "/bin/sh"; inherit system;
      args = [ "-c" "PATH=/usr/bin:/bin; mkdir -p $out/lib; seq 1 30000 > $out/lib/numbers; seq 1 20000 | sed 's/$/ base library line/' > $out/lib/libbase.txt" ];
    };
    mk = name: version: mode: derivation {
      name = "nixos-system-${name}-${version}"; builder = "/bin/sh"; inherit system base;
      act = "#!/bin/sh\necho \"$1 ${name} ${version}\" >> \"$REUP_ROOT/activations\"\n"
        + (if mode == "slow" then "sleep 3\n" else "")
        + (if mode == "timed" then "echo \"begin $(date +%s.%N)\" >> \"$REUP_ROOT/timeline\"\nsleep 1\necho \"end $(date +%s.%N)\" >> \"$REUP_ROOT/timeline\"\n" else "")
        + (if mode == "fail" then "echo 'activation of ${name} ${version} failed' >&2\nexit 1\n" else "");
      args = [ "-c" (if mode == "build" then "echo 'the build of ${name} ${version} broke' >&2; exit 1" else "PATH=/usr/bin:/bin; mkdir -p $out/bin $out/etc; echo ${version} > $out/version; ln -s $base $out/base; seq 1 5000 | sed 's/$/ ${name} config/' > $out/etc/system.conf; echo 'version ${version}' >> $out/etc/system.conf; printf '%s' \"$act\" > $out/bin/switch-to-configuration; chmod +x $out/bin/switch-to-configuration") ];
    };
  in {
    nixosConfigurations = {
'''


def flake_text(configs: Mapping[str, str]) -> str:
    """flake.nix for {configuration name: version}; see the module docstring for the special values."""
    lines = [_HEAD]
    for name, spec in sorted(configs.items()):
        if spec == "!eval":
            lines.append(f'      "{name}" = throw "configuration {name} is broken";\n')
            continue
        version, _, mode = spec.partition("!")
        lines.append(f'      "{name}" = {{ config.system.build.toplevel = mk "{name}" "{version}" "{mode}"; }};\n')
    lines.append("    };\n  };\n}\n")
    return "".join(lines)


def git(repo: str, *args: str) -> str:
    env = {**os.environ, **GIT_ENV}
    proc = subprocess.run(["git", "-C", repo, *args], check=True, capture_output=True, text=True, env=env)
    return proc.stdout.strip()


def init_repo(path: str, branch: str = "main") -> None:
    os.makedirs(path, exist_ok=True)
    git(path, "init", "-q", "-b", branch)


def commit(repo: str, message: str, *, configs: Mapping[str, str] | None = None, fleet: str | None = None) -> str:
    """Write flake.nix and/or fleet.toml, commit them; return the commit id."""
    if configs is not None:
        with open(os.path.join(repo, "flake.nix"), "w", encoding="utf-8") as f:
            f.write(flake_text(configs))
    if fleet is not None:
        with open(os.path.join(repo, "fleet.toml"), "w", encoding="utf-8") as f:
            f.write(fleet)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "--allow-empty", "-m", message)
    return git(repo, "rev-parse", "HEAD")
