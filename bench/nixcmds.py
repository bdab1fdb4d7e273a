"""The benchmark's own Nix commands (pure argv builders): building the corpus with `nix build -f`,
copying closures into a simulated device's store, verifying it, and `nix-store --export` (the
`nix copy` baseline). Used by bench/corpus.py, bench/reup_rows.py and bench/baselines.py; the
product's Nix calls are in reup.io.nix, whose options and feature flags these share.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from reup.io.nix import FEATURES, option_args


def build_file_cmd(
    nix_file: str,
    attrs: Iterable[str],
    *,
    argstr: Mapping[str, str] | None = None,
    out_link: str | None = None,
    options: Mapping[str, str] | None = None,
) -> list[str]:
    """`nix build -f FILE ATTR...` with `--argstr`s; `out_link` makes GC roots (else --no-link)."""
    argv = ["nix", *FEATURES, "build", "--json"]
    argv += ["--out-link", out_link] if out_link else ["--no-link"]
    argv += option_args(options)
    for key, value in sorted((argstr or {}).items()):
        argv += ["--argstr", key, value]
    return argv + ["-f", nix_file, *attrs]


def copy_to_cmd(paths: Iterable[str], store: str, *, check_sigs: bool = False) -> list[str]:
    """`nix copy --to STORE PATH...` (their closures); STORE may be a directory (a chroot store)."""
    argv = ["nix", *FEATURES, "copy"]
    if not check_sigs:
        argv.append("--no-check-sigs")
    return argv + ["--to", store, *paths]


def store_verify_cmd(paths: Iterable[str], *, store: str | None = None, recursive: bool = True) -> list[str]:
    """`nix store verify --no-trust` (contents against the recorded NAR hashes, no signatures)."""
    argv = ["nix", *FEATURES, "store", "verify", "--no-trust"]
    if store:
        argv += ["--store", store]
    if recursive:
        argv.append("-r")
    return argv + list(paths)


def export_cmd(paths: Iterable[str]) -> list[str]:
    """`nix-store --export PATH...`: the NAR-with-metadata archive `nix copy` moves (stdout, binary)."""
    return ["nix-store", "--export", *paths]
