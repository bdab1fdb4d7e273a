"""Integration: the fleet repo through pygit2 + watchdog (source.py) and Nix evaluation/builds
with per-device error isolation and GC roots (builder.py), with real git and real Nix."""

from __future__ import annotations

import os
import threading

import pytest
from reup.config.fleet_toml import parse_fleet
from reup.core.errors import PermanentError
from reup.io.builder import Builder, GcRoots
from reup.io.nix import NixExecutor
from reup.io.source import GitSource
from reup_lab import demofleet

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH0d6u0xjBWm0m1u2q5Sg8jzxf9C2ri8Hc3tnrsY+q0a"
FLEET = "".join(
    f'[devices.{n}]\nhost = "h"\nhost_key = "{KEY}"\nconfig = "{c}"\n\n'
    for n, c in [("a", "alpha"), ("b", "beta"), ("c", "beta"), ("d", "delta")]
)


def test_fetch_read_and_watch(tmp_path: os.PathLike[str]) -> None:
    repo = os.path.join(tmp_path, "fleet")
    demofleet.init_repo(repo)
    c1 = demofleet.commit(repo, "one", configs={"alpha": "1"}, fleet=FLEET)
    src = GitSource(repo, "main", os.path.join(tmp_path, "mirror.git"))
    assert src.fetch() == c1
    assert src.read_file(c1, "fleet.toml") == FLEET
    assert src.read_file(c1, "missing.toml") is None
    assert src.flake_ref(c1).endswith(f"mirror.git?ref=refs/heads/main&rev={c1}")

    changed = threading.Event()
    stop = src.watch(changed.set)
    try:
        changed.clear()
        c2 = demofleet.commit(repo, "two", configs={"alpha": "2"})
        assert changed.wait(2.0), "no ref change seen within 2 s"
    finally:
        stop()
    assert src.fetch() == c2
    # A restarted controller opens the existing mirror.
    assert GitSource(repo, "main", os.path.join(tmp_path, "mirror.git")).fetch() == c2


def test_fetch_itself_is_no_ref_change(tmp_path: os.PathLike[str]) -> None:
    """Reading the repository's refs (our own fetch) is no change: watchdog reports opens and closes
    without writes too, and reacting to those made every fetch request the next one (a fetch per pass)."""
    repo = os.path.join(tmp_path, "fleet")
    demofleet.init_repo(repo)
    demofleet.commit(repo, "one", configs={"alpha": "1"}, fleet=FLEET)
    src = GitSource(repo, "main", os.path.join(tmp_path, "mirror.git"))
    src.fetch()
    changed = threading.Event()
    stop = src.watch(changed.set)
    try:
        for _ in range(3):
            src.fetch()
        assert not changed.wait(1.0), "a fetch of an unchanged repository was reported as a ref change"
    finally:
        stop()


@pytest.mark.slow
def test_evaluate_isolates_errors_and_build_and_roots(tmp_path: os.PathLike[str]) -> None:
    repo = os.path.join(tmp_path, "fleet")
    demofleet.init_repo(repo)
    # beta is shared by b and c; delta throws; gamma is referenced by nobody.
    c1 = demofleet.commit(repo, "one", configs={"alpha": "1", "beta": "1", "delta": "!eval", "gamma": "1"}, fleet=FLEET)
    src = GitSource(repo, "main", os.path.join(tmp_path, "mirror.git"))
    src.fetch()
    nix = NixExecutor(options={"sandbox": "false", "substituters": ""})
    builder = Builder(nix, log_dir=os.path.join(tmp_path, "logs"))
    fleet = parse_fleet(FLEET)
    targets = {t.device: t for t in builder.evaluate(src.flake_ref(c1), fleet, c1)}
    assert targets["b"].drv_path == targets["c"].drv_path and targets["b"].drv_path != targets["a"].drv_path
    assert targets["a"].error is None and targets["a"].toplevel and (targets["a"].drv_path or "").endswith(".drv")
    assert targets["d"].drv_path is None and "configuration delta is broken" in (targets["d"].error or "")

    # An error that tryEval cannot catch (a type error) falls back to one evaluation per device.
    with open(os.path.join(repo, "flake.nix"), encoding="utf-8") as f:
        text = f.read()
    with open(os.path.join(repo, "flake.nix"), "w", encoding="utf-8") as f:
        f.write(text.replace('"delta" = throw "configuration delta is broken";',
                             '"delta" = { config.system.build.toplevel = 1 + "x"; };'))
    c2 = demofleet.commit(repo, "type error")
    src.fetch()
    targets2 = {t.device: t for t in builder.evaluate(src.flake_ref(c2), fleet, c2)}
    assert targets2["a"].toplevel == targets["a"].toplevel
    assert "cannot add a string to an integer" in (targets2["d"].error or "")

    out = builder.build(targets["a"].drv_path or "")
    assert out == targets["a"].toplevel and os.path.exists(os.path.join(out, "bin/switch-to-configuration"))
    with pytest.raises(PermanentError, match="build failed") as failed:
        builder.build("/nix/store/00000000000000000000000000000000-missing.drv")
    log_file = os.path.join(tmp_path, "logs", "00000000000000000000000000000000-missing.drv.log")
    assert f"full log: {log_file}" in str(failed.value) and os.path.getsize(log_file) > 0

    roots_dir = os.path.join(tmp_path, "gcroots")
    roots = GcRoots(nix, roots_dir, batch=1)
    unbuilt = "/nix/store/00000000000000000000000000000000-unbuilt"
    assert roots.sync({out, unbuilt}) == ([out], [])
    assert roots.sync({out, unbuilt}) == ([], [])  # unchanged: no Nix call, no new directory
    links = [os.path.join(roots_dir, "1", n) for n in sorted(os.listdir(os.path.join(roots_dir, "1"))) if n != "paths.json"]
    assert [os.readlink(link) for link in links] == [out]
    auto = nix.run(["nix-store", "--gc", "--print-roots"])
    assert links[0] in auto
    # Two systems, one root each, in batches of one path: links r0 and r1 of the new directory.
    other = builder.build(targets["b"].drv_path or "")
    assert roots.sync({out, other}) == ([other], [])
    assert sorted(os.listdir(roots_dir)) == ["2"]
    kept = {os.readlink(os.path.join(roots_dir, "2", n)) for n in os.listdir(os.path.join(roots_dir, "2")) if n != "paths.json"}
    assert kept == {out, other}
    assert roots.sync(set()) == ([], sorted([out, other]))
    assert roots.current() == set()
