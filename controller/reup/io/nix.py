"""One executor for every Nix call reup makes.

Each Nix operation is a pure pair: a command builder (arguments -> argv) and an
output parser (stdout -> typed result), golden-tested in tests/unit/test_nix_commands.py
against captured Nix output (tests/unit/fixtures/nix/).
`NixExecutor` runs them; the delta encoder, the controller's builder, the lab and
the benchmark (whose own command builders are in bench/nixcmds.py) all go through
it, so options (`--option` from reup.toml, the experimental features, a `--store`)
are applied in one place.
Works with Nix 2.8 (no `--print-out-paths`) and newer.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

FEATURES = ("--extra-experimental-features", "nix-command flakes")


class NixError(RuntimeError):
    """A Nix command failed; `stderr` holds Nix's own message."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        tail = stderr.strip().splitlines()[-8:]
        super().__init__(f"{argv[0]} {argv[1] if len(argv) > 1 else ''} failed ({returncode}): " + "\n".join(tail))


@dataclass(frozen=True)
class PathInfo:
    """What Nix knows of one valid store path (what a Nix database row holds)."""

    path: str
    nar_hash: str  # "sha256:<nix32 or base16 or SRI>", as Nix printed it
    nar_size: int
    references: tuple[str, ...]
    deriver: str | None


# --- command builders (pure) -------------------------------------------------


def path_info_cmd(paths: Iterable[str], *, recursive: bool = False, store: str | None = None) -> list[str]:
    argv = ["nix", *FEATURES, "path-info", "--json"]
    if recursive:
        argv.append("--recursive")
    if store:
        argv += ["--store", store]
    return argv + list(paths)


def build_cmd(installables: Iterable[str], *, options: Mapping[str, str] | None = None) -> list[str]:
    argv = ["nix", *FEATURES, "build", "--json", "--no-link"]
    argv += option_args(options)
    return argv + list(installables)


def eval_json_cmd(
    installable: str, *, apply: str | None = None, options: Mapping[str, str] | None = None, impure: bool = False
) -> list[str]:
    argv = ["nix", *FEATURES, "eval", "--json"]
    if impure:  # to read the data file named in the environment (`eval_names_json`)
        argv.append("--impure")
    argv += option_args(options)
    argv.append(installable)
    if apply is not None:
        argv += ["--apply", apply]
    return argv


def current_system_cmd() -> list[str]:
    return ["nix", *FEATURES, "eval", "--impure", "--raw", "--expr", "builtins.currentSystem"]


def option_args(options: Mapping[str, str] | None) -> list[str]:
    out: list[str] = []
    for key, value in sorted((options or {}).items()):
        out += ["--option", key, value]
    return out


# --- output parsers (pure) ---------------------------------------------------


def parse_path_info(stdout: str) -> list[PathInfo]:
    """Parse `nix path-info --json`: a list of objects with a `path` (Nix <= 2.18, `"valid": false`
    for a path not in the store) or an object keyed by path (Nix 2.19+, `null` for one not in the
    store); references and deriver as full paths or base names. A malformed answer is a ValueError."""
    data = json.loads(stdout)
    items: list[tuple[str, object]]
    if isinstance(data, dict):
        items = [(str(k), v) for k, v in data.items() if v is not None]
    elif isinstance(data, list):
        items = [(str(d.get("path")), d) for d in data if not isinstance(d, dict) or d.get("valid", True)]
    else:
        raise ValueError(f"nix path-info --json: expected a list or an object, got {type(data).__name__}")
    return [_path_info(path, d) for path, d in items]


def _path_info(path: str, d: object) -> PathInfo:
    if not isinstance(d, dict) or not path.startswith("/"):
        raise ValueError(f"nix path-info --json: {path}: expected an object with a store path, got {d!r}")
    refs, deriver, nar_hash, nar_size = d.get("references") or [], d.get("deriver"), d.get("narHash"), d.get("narSize")
    if not isinstance(refs, list) or not isinstance(nar_hash, str) or not isinstance(nar_size, int):
        raise ValueError(f"nix path-info --json: {path}: malformed narHash, narSize or references")
    return PathInfo(
        path=path,
        nar_hash=nar_hash,
        nar_size=nar_size,
        references=tuple(sorted(_abs_store_path(path, str(r)) for r in refs)),
        deriver=_abs_store_path(path, str(deriver)) if deriver else None,
    )


def _abs_store_path(sibling: str, ref: str) -> str:
    # Newer Nix may print references as base names.
    return ref if ref.startswith("/") else os.path.join(os.path.dirname(sibling), ref)


def parse_build_json_by_drv(stdout: str) -> dict[str, dict[str, str]]:
    """Parse `nix build --json` of many derivations: {drvPath: {output name: path}}."""
    return {str(item["drvPath"]): dict(item["outputs"]) for item in json.loads(stdout) if "drvPath" in item}


def parse_build_json(stdout: str) -> list[dict[str, str]]:
    """Parse `nix build --json`: per installable, its outputs {name: path}."""
    return [dict(item["outputs"]) for item in json.loads(stdout)]


# --- the executor ------------------------------------------------------------


@dataclass
class NixExecutor:
    """Runs Nix commands with shared options; raises NixError with Nix's message."""

    options: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] | None = None
    cwd: str | None = None

    def run(self, argv: Sequence[str], *, timeout: float | None = None, env: Mapping[str, str] | None = None) -> str:
        extra = {**(self.env or {}), **(env or {})}
        try:
            proc = subprocess.run(
                list(argv),
                capture_output=True,
                text=True,
                env={**os.environ, **extra} if extra else None,
                cwd=self.cwd,
                timeout=timeout,
                check=False,
            )
        except OSError as exc:  # E2BIG, ENOENT, EMFILE...: a reported error, never an uncaught crash
            raise NixError(argv, -1, f"cannot run {argv[0]}: {exc}") from exc
        if proc.returncode != 0:
            raise NixError(argv, proc.returncode, proc.stderr)
        return proc.stdout

    def path_info(self, paths: Sequence[str], *, recursive: bool = False) -> list[PathInfo]:
        if not paths:
            return []
        return parse_path_info(self.run(path_info_cmd(paths, recursive=recursive)))

    def closure(self, paths: Sequence[str]) -> dict[str, PathInfo]:
        """All paths in the closures of `paths`, keyed by store path."""
        return {p.path: p for p in self.path_info(paths, recursive=True)}

    def build(self, installables: Sequence[str]) -> list[dict[str, str]]:
        return parse_build_json(self.run(build_cmd(installables, options=self.options)))

    def build_drvs(self, drv_paths: Sequence[str]) -> dict[str, dict[str, str]]:
        """One `nix build --keep-going` of many derivations (Nix's scheduler); {drvPath: outputs}."""
        argv = build_cmd(drv_paths, options=self.options)
        argv.insert(argv.index("--no-link") + 1, "--keep-going")
        return parse_build_json_by_drv(self.run(argv))

    def eval_json(self, installable: str, *, apply: str | None = None) -> object:
        return json.loads(self.run(eval_json_cmd(installable, apply=apply, options=self.options)))

    def eval_names_json(self, installable: str, apply: str, names: Sequence[str], *, workdir: str | None = None) -> object:
        """`nix eval --json --impure INSTALLABLE --apply APPLY` where APPLY reads `names` (any strings) as
        JSON data from a file named by $REUP_NAMES_FILE: values never become Nix source or one huge argument."""
        import tempfile  # noqa: PLC0415 - only here

        with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".json", dir=workdir, delete=True) as f:
            json.dump(list(names), f, ensure_ascii=False)
            f.flush()
            argv = eval_json_cmd(installable, apply=apply, options=self.options, impure=True)
            return json.loads(self.run(argv, env={NAMES_ENV: f.name}))

    def current_system(self) -> str:
        """The platform this Nix builds for by default, e.g. "x86_64-linux"."""
        return self.run(current_system_cmd()).strip()


def resolve_store_path(path: str, store_dir: str = "/nix/store") -> str:
    """Accept a store path or a symlink to one (e.g. ./result); return the store path."""
    real = os.path.realpath(path)
    prefix = store_dir.rstrip("/") + "/"
    if not real.startswith(prefix):
        raise ValueError(f"{path}: not a store path (resolves to {real})")
    top = prefix + real[len(prefix):].split("/", 1)[0]
    if top.endswith(".drv"):
        raise ValueError(f"{path}: is a derivation, not an output path")
    return top


# --- builders used by the controller (reup run/plan) --------------------------


NAMES_ENV = "REUP_NAMES_FILE"
_NAMES = f'(builtins.fromJSON (builtins.readFile (builtins.getEnv "{NAMES_ENV}")))'

# With `eval_names_json`: {config: [drvPath, outPath] or null} for each configuration name in the data file.
# A constant expression: names are data, so `${...}`, quotes or non-ASCII in a name are just characters.
TOPLEVELS_OF_NAMES_APPLY = (
    "cs: let f = n: if cs ? ${n} then (let t = cs.${n}.config.system.build.toplevel;"
    " r = builtins.tryEval (builtins.deepSeq [t.drvPath t.outPath] [t.drvPath t.outPath]);"
    " in if r.success then r.value else null) else null;"
    f" in builtins.listToAttrs (map (n: {{ name = n; value = f n; }}) {_NAMES})"
)

# With `eval_names_json` and one name: that configuration's [drvPath, outPath], or Nix's own error.
TOPLEVEL_OF_NAME_APPLY = (
    f"cs: let n = builtins.head {_NAMES}; t = cs.${{n}}.config.system.build.toplevel; in [ t.drvPath t.outPath ]"
)


def toplevel_installable(flake: str, config: str) -> str:
    return f"{flake}#nixosConfigurations.{json.dumps(config)}.config.system.build.toplevel"


def toplevel_drv_installable(flake: str, config: str) -> str:
    return toplevel_installable(flake, config) + ".drvPath"


def parse_toplevels(value: object) -> dict[str, tuple[str, str] | None]:
    """Parse the result of `TOPLEVELS_OF_NAMES_APPLY`: {configuration: (drvPath, outPath) or None}."""
    if not isinstance(value, dict):
        raise ValueError(f"expected an object, got {type(value).__name__}")
    out: dict[str, tuple[str, str] | None] = {}
    for dev, item in value.items():
        if item is None:
            out[str(dev)] = None
        elif isinstance(item, list) and len(item) == 2 and all(isinstance(p, str) for p in item):
            out[str(dev)] = (item[0], item[1])
        else:
            raise ValueError(f"{dev}: unexpected value {item!r}")
    return out


def add_root_cmd(path: str, link: str) -> list[str]:
    """`nix-store --add-root LINK --realise PATH`: an indirect GC root at LINK keeping PATH alive."""
    return ["nix-store", "--add-root", link, "--realise", path]


def add_roots_cmd(paths: Sequence[str], link: str) -> list[str]:
    """One call for many roots: `nix-store --add-root LINK --indirect --realise P1 P2 ...` makes the links
    LINK, LINK-2, LINK-3, ... (Nix numbers them), each an indirect GC root keeping one path alive."""
    return ["nix-store", "--add-root", link, "--indirect", "--realise", *paths]


# --- a simulated device's store (the lab's devices, bench/) -------------------


def init_store_cmd(root: str) -> list[str]:
    """`nix-store --store ROOT --init`: an empty Nix store and database under ROOT (a simulated device)."""
    return ["nix-store", "--store", root, "--init"]
