"""`reup init DIR [--offline]`: start a fleet repo from `fleet-repo-template/`.

Called by cli/init.py (`reup init`) and the lab's demo.py (which starts its fleet
repo from the offline flavor). The template is found through `REUP_TEMPLATE_DIR`
(set by the Nix package) or next to this source tree (a checkout or editable
install). The NixOS flavor is everything but `offline/`; the offline flavor is
`offline/` alone, its `system` set to what the local Nix builds for.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

from reup.core.errors import ConfigError
from reup.io.nix import NixExecutor

_SYSTEM_LINE = re.compile(r'^(\s*system = )"[^"]*";', re.MULTILINE)
GIT_ENV = {"GIT_AUTHOR_NAME": "reup", "GIT_AUTHOR_EMAIL": "reup@localhost",
           "GIT_COMMITTER_NAME": "reup", "GIT_COMMITTER_EMAIL": "reup@localhost"}


def template_dir() -> str:
    """REUP_TEMPLATE_DIR, else the copy installed with the package (controller/setup.py), else the source
    tree's."""
    env = os.environ.get("REUP_TEMPLATE_DIR")
    candidates = [env] if env else []
    package = os.path.dirname(os.path.dirname(__file__))
    candidates += [os.path.join(package, "fleet_template"), os.path.join(package, "..", "..", "fleet-repo-template")]
    for path in candidates:
        if os.path.isfile(os.path.join(path, "fleet.toml")):
            return os.path.normpath(path)
    raise ConfigError("the fleet-repo template is not installed with reup: set REUP_TEMPLATE_DIR to its directory")


def init_fleet_repo(dest: str, *, offline: bool = False, system: str | None = None,
                    nix: NixExecutor | None = None, commit: bool = True) -> str:
    """Copy the template to `dest` (missing or empty), `git init` it and commit; return the commit id
    (or "" without `commit`)."""
    if os.path.exists(dest) and os.listdir(dest):
        raise ConfigError(f"{dest}: exists and is not empty")
    src = template_dir()
    if offline:
        shutil.copytree(os.path.join(src, "offline"), dest, dirs_exist_ok=True)
        flake = os.path.join(dest, "flake.nix")
        with open(flake, encoding="utf-8") as f:
            text = f.read()
        system = system or (nix or NixExecutor()).current_system()
        with open(flake, "w", encoding="utf-8") as f:
            f.write(_SYSTEM_LINE.sub(lambda m: f'{m.group(1)}"{system}";', text, count=1))
    else:
        shutil.copytree(src, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns("offline"))
    for root, dirs, files in os.walk(dest):  # the template may come read-only from the Nix store
        for name in dirs + files:
            os.chmod(os.path.join(root, name), 0o755 if name in dirs else 0o644)
    git(dest, "init", "-q", "-b", "main")
    if not commit:
        return ""
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", "reup init" + (" --offline" if offline else ""))
    return git(dest, "rev-parse", "HEAD")


def git(repo: str, *args: str) -> str:
    env = {**os.environ, **_fallback_identity(repo)}
    proc = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise ConfigError(f"git {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout.strip()


def _fallback_identity(repo: str) -> dict[str, str]:
    """reup's own identity for the parts of the user's that git lacks (the user's wins: their commit)."""
    out: dict[str, str] = {}
    for key, (author, committer) in (("name", ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME")),
                                     ("email", ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"))):
        configured = subprocess.run(["git", "-C", repo, "config", "--get", f"user.{key}"], capture_output=True,
                                    text=True, check=False).stdout.strip()
        for var in (author, committer):
            if not configured and not os.environ.get(var):
                out[var] = GIT_ENV[var]
    return out
