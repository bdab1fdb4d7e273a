"""The fleet template ships placeholder host keys, which fleet.toml's schema refuses (as it should);
tests that read the template swap them for a well-formed key first."""

from __future__ import annotations

import re

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH0d6u0xjBWm0m1u2q5Sg8jzxf9C2ri8Hc3tnrsY+q0a"
PLACEHOLDER = re.compile(r"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPLACEHOLDER\w*")


def with_real_keys(fleet_toml: str) -> str:
    assert PLACEHOLDER.search(fleet_toml), "the template no longer has placeholders: drop this helper"
    return PLACEHOLDER.sub(KEY, fleet_toml)
