"""Fetch the benchmark's real binaries into a local cache (`bench/.work/inputs/`).

Called by `bench.corpus` before it builds the corpus with Nix. Inputs are PyPI
wheels with compiled code (adjacent versions, via `pip download`), a pure-Python
wheel's patch release, source distributions vendoring a C library (zstd), and
Debian package binaries (via `apt-get download`); the new downloads are pinned
by SHA-256 (`PINNED`). Everything is cached: a second run
downloads nothing. Nothing fetched here is ever committed (the cache is gitignored).
The manifest written here (`manifest.json`) is what `bench/nix/corpus.nix` reads.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# (distribution, versions): adjacent releases of wheels with compiled code.
WHEELS: dict[str, tuple[str, ...]] = {
    "pydantic-core": ("2.23.3", "2.23.4"),  # the application's compiled dependency
    "ruff": ("0.6.8", "0.6.9"),  # the large binary (tens of MB, one ELF)
    "msgpack": ("1.1.0",),  # unchanged across generations
    "typing-extensions": ("4.12.2",),  # pure Python, needed by pydantic-core
}
# Pure-Python wheels whose adjacent releases are a scenario of their own (installed with .pyc).
PURE_WHEELS: dict[str, tuple[str, ...]] = {"urllib3": ("2.2.2", "2.2.3")}
# Source distributions that vendor a widely used C library, built from source in the corpus:
# python-zstandard 0.22.0 / 0.23.0 carry zstd 1.5.5 / 1.5.6 as one amalgamated zstd.c.
SDISTS: dict[str, dict[str, str]] = {"zstandard": {"0.22.0": "1.5.5", "0.23.0": "1.5.6"}}
# The new registry downloads are pinned: a changed file is refused, never measured.
PINNED: dict[str, str] = {
    "urllib3-2.2.2-py3-none-any.whl": "a448b2f64d686155468037e1ace9f2d2199776e17f0a46610480d311f73e3472",
    "urllib3-2.2.3-py3-none-any.whl": "ca899ca043dcb1bafa3e262d73aa25c465bfb49e0bd9dd5d59f1d0acba2f8fac",
    "zstandard-0.22.0.tar.gz": "8226a33c542bcb54cd6bd0a366067b610b41713b64c9abec1bc4533d69f51e70",
    "zstandard-0.23.0.tar.gz": "b2d8c62d08e7255f68f7a740bae85b3c9b8e5466baa9cbf7f57f1cde0ac6bc09",
}
# Debian packages whose binaries the device carries unchanged (one version each).
DEBS: tuple[str, ...] = ("jq", "libjq1", "libonig5", "sqlite3", "libsqlite3-0")

_PLATFORMS = ("manylinux_2_17_x86_64", "manylinux2014_x86_64")


@dataclass(frozen=True)
class Inputs:
    """Where the fetched files are and the manifest describing them."""

    dir: Path
    manifest: Path
    files: dict[str, str]  # "wheel:ruff:0.6.8" / "deb:jq" -> file name inside dir


def wheel_key(dist: str, version: str) -> str:
    return f"wheel:{dist}:{version}"


def wheel_glob(dist: str, version: str) -> str:
    """The file-name pattern of a wheel (PEP 427 normalises '-' to '_')."""
    return f"{re.sub(r'[-_.]+', '_', dist)}-{version}-*.whl"


def pip_download_cmd(dist: str, version: str, dest: Path) -> list[str]:
    argv = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    argv += ["--python-version", "3.11", "--implementation", "cp", "--abi", "cp311"]
    for plat in _PLATFORMS:
        argv += ["--platform", plat]
    return argv + ["-d", str(dest), f"{dist}=={version}"]


def sdist_download_cmd(dist: str, version: str, dest: Path) -> list[str]:
    argv = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary=:all:"]
    return argv + ["-d", str(dest), f"{dist}=={version}"]


def check_pin(path: Path) -> None:
    """Refuse a pinned input whose SHA-256 differs (a corrupt cache or a changed upload)."""
    want = PINNED.get(path.name)
    if want is None:
        return
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    if h.hexdigest() != want:
        raise RuntimeError(f"{path.name}: sha256 {h.hexdigest()} is not the pinned {want}")


def deb_version(filename: str) -> str:
    """`jq_1.6-2.1+deb12u3_amd64.deb` -> `1.6-2.1+deb12u3`."""
    parts = os.path.basename(filename).split("_")
    if len(parts) != 3 or not parts[2].endswith(".deb"):
        raise ValueError(f"not a Debian package file name: {filename}")
    return parts[1]


def fetch(workdir: Path, *, log: bool = True) -> Inputs:
    """Download what is missing into workdir/inputs and write the manifest."""
    dest = workdir / "inputs"
    dest.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    for dist, versions in {**WHEELS, **PURE_WHEELS}.items():
        for version in versions:
            found = sorted(glob.glob(str(dest / wheel_glob(dist, version))))
            if not found:
                if log:
                    print(f"bench: pip download {dist}=={version}", file=sys.stderr)
                subprocess.run(pip_download_cmd(dist, version, dest), check=True)
                found = sorted(glob.glob(str(dest / wheel_glob(dist, version))))
            if not found:
                raise RuntimeError(f"pip download gave no wheel for {dist}=={version}")
            check_pin(Path(found[-1]))
            files[wheel_key(dist, version)] = os.path.basename(found[-1])
    for dist, vendored in SDISTS.items():
        for version in vendored:
            name = f"{dist}-{version}.tar.gz"
            if not (dest / name).exists():
                if log:
                    print(f"bench: pip download {dist}=={version} (source)", file=sys.stderr)
                subprocess.run(sdist_download_cmd(dist, version, dest), check=True)
            if not (dest / name).exists():
                raise RuntimeError(f"pip download gave no source distribution {name}")
            check_pin(dest / name)
            files[f"sdist:{dist}:{version}"] = name
    debdir = dest / "debs"
    debdir.mkdir(exist_ok=True)
    for pkg in DEBS:
        found = sorted(glob.glob(str(debdir / f"{pkg}_*_amd64.deb")))
        if not found:
            if log:
                print(f"bench: apt-get download {pkg}", file=sys.stderr)
            subprocess.run(["apt-get", "download", "-q", pkg], cwd=debdir, check=True,
                           stdout=subprocess.DEVNULL)
            found = sorted(glob.glob(str(debdir / f"{pkg}_*_amd64.deb")))
        if not found:
            raise RuntimeError(f"apt-get download gave no package for {pkg}")
        files[f"deb:{pkg}"] = "debs/" + os.path.basename(found[-1])
    manifest = dest / "manifest.json"
    manifest.write_text(json.dumps(manifest_data(dest, files), indent=1, sort_keys=True))
    return Inputs(dir=dest, manifest=manifest, files=files)


def manifest_data(dest: Path, files: dict[str, str]) -> dict[str, object]:
    """The JSON the Nix corpus reads: wheels[dist][version] and debs[pkg] = {file, version}."""
    wheels: dict[str, dict[str, str]] = {}
    debs: dict[str, dict[str, str]] = {}
    vendored: dict[str, dict[str, str]] = {}  # C library -> its version -> source archive
    for key, name in sorted(files.items()):
        kind, rest = key.split(":", 1)
        if kind == "wheel":
            dist, version = rest.split(":", 1)
            wheels.setdefault(dist, {})[version] = name
        elif kind == "sdist":
            dist, version = rest.split(":", 1)
            vendored.setdefault("zstd" if dist == "zstandard" else dist, {})[SDISTS[dist][version]] = name
        else:
            debs[rest] = {"file": name, "version": deb_version(name)}
    return {"dir": str(dest.resolve()), "wheels": wheels, "debs": debs, "vendored": vendored}
