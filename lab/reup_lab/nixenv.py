"""The Nix settings for running offline on a development or CI machine: defined once here.

Flakes and the new CLI on, no sandbox (the example and test derivations use the
host's /bin/sh and gcc), no substituters (no network). Used by the lab's demo
(demo.py), the tests (tests/conftest.py sets it for the whole session;
tests/support/ and the integration tests pass `nix_env()` to Nix subprocesses)
and the benchmark (bench/run.py, on top of the caller's own NIX_CONFIG).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

NIX_CONFIG = "experimental-features = nix-command flakes\nsandbox = false\nsubstituters =\n"


def nix_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) with NIX_CONFIG set to the offline settings."""
    return {**(os.environ if base is None else base), "NIX_CONFIG": NIX_CONFIG}


def extended_nix_config(current: str | None) -> str:
    """The offline settings after `current` (a caller's own NIX_CONFIG), so that they win."""
    return f"{current.rstrip()}\n{NIX_CONFIG}" if current and current.strip() else NIX_CONFIG
