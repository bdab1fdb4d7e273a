"""Shared fixtures. Nix runs offline: NIX_CONFIG is set for the whole test session."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from support.nixflake import NIX_CONFIG, Generations, build_generations
from support.receiverkit import StreamCache, copy_root, nix_copy, set_generations

FLAKE_SALT = "t1"  # change to force fresh store paths for the test flake


def pytest_configure(config: pytest.Config) -> None:
    os.environ["NIX_CONFIG"] = NIX_CONFIG


@pytest.fixture(scope="session")
def gens(tmp_path_factory: pytest.TempPathFactory) -> Generations:
    """The test flake's generations, built once per session (per xdist worker)."""
    return build_generations(str(tmp_path_factory.mktemp("flake")), salt=FLAKE_SALT)


@pytest.fixture(scope="session")
def gen1_template(gens: Generations, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A device root holding generation 1 (Nix DB, system-1-link); copied per test."""
    root = str(tmp_path_factory.mktemp("gen1-template") / "root")
    nix_copy(root, [gens.gen1])
    set_generations(root, [gens.gen1])
    return root


@pytest.fixture
def gen1_root(gen1_template: str, tmp_path: os.PathLike[str]) -> Iterator[str]:
    """A fresh device root on generation 1."""
    yield copy_root(gen1_template, os.path.join(tmp_path, "device"))


@pytest.fixture(scope="session")
def streams(tmp_path_factory: pytest.TempPathFactory) -> StreamCache:
    """Encoder output cached per session: `streams.get(held, target, staged)`."""
    return StreamCache(str(tmp_path_factory.mktemp("streams")))
