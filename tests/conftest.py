"""Shared fixtures. Nix runs offline: NIX_CONFIG is set for the whole test session."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest
from reup_lab.nixenv import NIX_CONFIG
from support.nixflake import Generations, build_generations
from support.receiverkit import SCRATCH, StreamCache, copy_root, nix_copy, set_generations

FLAKE_SALT = "t1"  # change to force fresh store paths for the test flake


def pytest_configure(config: pytest.Config) -> None:
    os.environ["NIX_CONFIG"] = NIX_CONFIG


@pytest.fixture(scope="session")
def gens(tmp_path_factory: pytest.TempPathFactory) -> Generations:
    """The test flake's generations, built once per session (per xdist worker)."""
    return build_generations(str(tmp_path_factory.mktemp("flake")), salt=FLAKE_SALT)


def _scratch(fallback: str) -> str:
    return tempfile.mkdtemp(prefix="reup-test-", dir=SCRATCH) if SCRATCH else fallback


@pytest.fixture
def dev_tmp(tmp_path: os.PathLike[str]) -> Iterator[str]:
    """A per-test directory for device roots (RAM-backed where possible), removed after."""
    d = _scratch(str(tmp_path))
    yield d
    if SCRATCH:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def gen1_template(gens: Generations, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A device root holding generation 1 (Nix DB, system-1-link); copied per test."""
    d = _scratch(str(tmp_path_factory.mktemp("gen1-template")))
    root = os.path.join(d, "root")
    nix_copy(root, [gens.gen1])
    set_generations(root, [gens.gen1])
    yield root
    if SCRATCH:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def gen1_root(gen1_template: str, dev_tmp: str) -> str:
    """A fresh device root on generation 1."""
    return copy_root(gen1_template, os.path.join(dev_tmp, "device"))


@pytest.fixture(scope="session")
def streams(tmp_path_factory: pytest.TempPathFactory) -> StreamCache:
    """Encoder output cached per session: `streams.get(held, target, staged)`."""
    return StreamCache(str(tmp_path_factory.mktemp("streams")))
