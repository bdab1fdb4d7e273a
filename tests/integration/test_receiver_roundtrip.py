"""Issue 2, Tests: round trips of real Nix generations through `reup delta` and `reup-receive`.

Device roots are populated with `nix copy --to DIR` (a real Nix database) and a
`system-1-link`; after each receive the device is checked with
`nix store verify --no-trust --store DIR -r TOPLEVEL`, by NAR hashes against
`nix-store --dump` of the host's copy, its profile links, the activation record,
the JSON on stdout and `--status`. Also: fresh installs (with and without a Nix
DB), an idempotent re-receive, roll back by stream and by `--rollback`,
`--gc --keep 1`, a failing activation, and registration without Nix tools.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from reup_lab.nixenv import nix_env
from reup_receiver.format.nar import parse_hash
from reup_receiver.format.wire import T_PATH
from support.nixflake import Generations
from support.receiverkit import (
    REUP,
    StreamCache,
    assert_one_line_error,
    db_rows,
    device_nar_hash,
    empty_db_root,
    host_nar_hash,
    nix_verify,
    profile_links,
    read_activations,
    receive,
    snapshot,
    status,
    visible_paths,
)
from support.streams import parse_records

pytestmark = pytest.mark.slow


def gen_to_2(root: str, gens: Generations, streams: StreamCache) -> dict[str, object]:
    run = receive(root, streams.get([gens.gen1], gens.gen2))
    assert run.returncode == 0, run.stderr
    return run.json()  # type: ignore[no-any-return]


def assert_holds(root: str, gens: Generations, toplevel: str) -> None:
    """`nix store verify` passes and every closure path's NAR equals the host's."""
    proc = nix_verify(root, toplevel)
    assert proc.returncode == 0, proc.stderr
    for path in gens.closure(toplevel):
        assert device_nar_hash(root, path) == host_nar_hash(path), path


def staging_empty(root: str) -> bool:
    done = os.path.join(root, "nix/store/.reup-staging/done")
    return not os.path.isdir(done) or os.listdir(done) == []


def test_delta_gen1_to_gen2_via_cli(gens: Generations, gen1_root: str, tmp_path: object) -> None:
    out = os.path.join(str(tmp_path), "delta.reup")
    enc = subprocess.run([REUP, "delta", "--from", gens.gen1, "--to", gens.gen2, "-o", out],
                         env=nix_env(), capture_output=True, text=True, check=False)
    assert enc.returncode == 0, enc.stderr
    with open(out, "rb") as fh:
        stream = fh.read()
    # The shared `data` path is on the device already: the stream must not carry it.
    assert gens.parts["data"] in gens.closure(gens.gen1)
    new = set(gens.closure(gens.gen2)) - set(gens.closure(gens.gen1))
    assert sum(1 for tag, _ in parse_records(stream) if tag == T_PATH) == len(new)

    run = receive(gen1_root, stream)
    assert run.returncode == 0, run.stderr
    result = run.json()
    assert result["generation"] == 2
    assert result["toplevel"] == gens.gen2
    assert sorted(result["installed"]) == sorted(new)
    assert result["bytes_read"] == len(stream)
    assert isinstance(result["seconds"], float | int) and result["seconds"] >= 0
    assert result["unchanged"] is False

    assert_holds(gen1_root, gens, gens.gen2)
    assert_holds(gen1_root, gens, gens.gen1)  # the old generation is untouched
    links = profile_links(gen1_root)
    assert links == {"system": "system-2-link", "system-1-link": gens.gen1,
                     "system-2-link": gens.gen2}
    assert read_activations(gen1_root) == [f"switch {gens.gen2}"]
    assert staging_empty(gen1_root)

    st = status(gen1_root)
    assert st["current"] == gens.gen2
    assert st["generation"] == 2
    assert st["generations"] == [{"number": 1, "toplevel": gens.gen1},
                                 {"number": 2, "toplevel": gens.gen2}]
    assert st["paths"] == sorted(set(gens.closure(gens.gen1)) | new)
    assert st["staged"] == []

    # The DB rows carry what Nix itself has for these paths.
    rows = {p: (h, size) for p, h, size, _ in db_rows(gen1_root)[0]}
    info = json.loads(subprocess.run(["nix", "path-info", "--json", *sorted(new)], env=nix_env(),
                                     capture_output=True, text=True, check=True).stdout)
    for item in info:
        h, size = rows[item["path"]]
        assert parse_hash(h) == parse_hash(item["narHash"])
        assert size == item["narSize"]


def test_fresh_install_into_empty_db(gens: Generations, streams: StreamCache,
                                     dev_tmp: str) -> None:
    root = empty_db_root(os.path.join(dev_tmp, "device"))
    stream = streams.get([], gens.gen2)
    run = receive(root, stream, "--activate", "boot")
    assert run.returncode == 0, run.stderr
    result = run.json()
    assert result["generation"] == 1 and result["toplevel"] == gens.gen2
    assert sorted(result["installed"]) == gens.closure(gens.gen2)
    assert_holds(root, gens, gens.gen2)
    assert profile_links(root) == {"system": "system-1-link", "system-1-link": gens.gen2}
    assert read_activations(root) == [f"boot {gens.gen2}"]
    assert visible_paths(root) == set(gens.closure(gens.gen2))


def test_fresh_install_without_db_keeps_own_records(gens: Generations, streams: StreamCache,
                                                    dev_tmp: str) -> None:
    root = os.path.join(dev_tmp, "device")
    os.makedirs(root)
    run = receive(root, streams.get([], gens.gen1), "--activate", "none")
    assert run.returncode == 0, run.stderr
    assert run.json()["generation"] == 1
    assert not os.path.exists(os.path.join(root, "nix/var/nix/db"))
    assert read_activations(root) == []  # --activate none
    closure = gens.closure(gens.gen1)
    assert visible_paths(root) == set(closure)
    info = {i["path"]: i for i in json.loads(subprocess.run(
        ["nix", "path-info", "--json", "-r", gens.gen1], env=nix_env(), capture_output=True,
        text=True, check=True).stdout)}
    for path in closure:
        assert device_nar_hash(root, path) == host_nar_hash(path)
        with open(os.path.join(root, "nix/var/reup/paths", os.path.basename(path) + ".json")) as fh:
            rec = json.load(fh)
        assert rec["path"] == path
        assert bytes.fromhex(rec["narHash"]) == parse_hash(info[path]["narHash"])
        assert rec["narSize"] == info[path]["narSize"]
        assert sorted(rec["references"]) == sorted(info[path]["references"])
    assert status(root)["paths"] == closure

    # A delta on top, then gc: without a DB the receiver's records drive it.
    run = receive(root, streams.get([gens.gen1], gens.gen2), "--activate", "none")
    assert run.returncode == 0, run.stderr
    run = receive(root, None, "--gc", "--keep", "1")
    assert run.returncode == 0, run.stderr
    only_old = set(closure) - set(gens.closure(gens.gen2))
    assert sorted(run.json()["deleted"]) == sorted(only_old)
    assert visible_paths(root) == set(gens.closure(gens.gen2))
    for path in only_old:
        assert not os.path.exists(os.path.join(root, "nix/var/reup/paths",
                                               os.path.basename(path) + ".json"))
    for path in gens.closure(gens.gen2):
        assert device_nar_hash(root, path) == host_nar_hash(path)


def test_same_delta_twice_is_unchanged(gens: Generations, streams: StreamCache,
                                       gen1_root: str) -> None:
    gen_to_2(gen1_root, gens, streams)
    before = snapshot(gen1_root)
    run = receive(gen1_root, streams.get([gens.gen1], gens.gen2))
    assert run.returncode == 0, run.stderr
    result = run.json()
    assert result["unchanged"] is True
    assert result["generation"] == 2 and result["installed"] == []
    after = snapshot(gen1_root)
    assert after == before  # no new generation, no re-activation, nothing re-registered
    assert staging_empty(gen1_root)  # the re-sent copies were dropped, not left staged
    assert_holds(gen1_root, gens, gens.gen2)


def test_rollback_by_stream_while_gen1_present(gens: Generations, streams: StreamCache,
                                               gen1_root: str) -> None:
    gen_to_2(gen1_root, gens, streams)
    stream = streams.get([gens.gen1, gens.gen2], gens.gen1)
    assert len(stream) < 1024  # nothing to carry: a manifest naming a known toplevel
    assert not any(tag == T_PATH for tag, _ in parse_records(stream))
    before_paths = visible_paths(gen1_root)
    run = receive(gen1_root, stream)
    assert run.returncode == 0, run.stderr
    assert run.json()["generation"] == 3 and run.json()["installed"] == []
    assert profile_links(gen1_root)["system"] == "system-3-link"
    assert profile_links(gen1_root)["system-3-link"] == gens.gen1
    assert read_activations(gen1_root)[-1] == f"switch {gens.gen1}"
    assert visible_paths(gen1_root) == before_paths
    assert_holds(gen1_root, gens, gens.gen1)


def test_rollback_verb(gens: Generations, streams: StreamCache, gen1_root: str) -> None:
    gen_to_2(gen1_root, gens, streams)
    run = receive(gen1_root, None, "--rollback")
    assert run.returncode == 0, run.stderr
    assert run.json() == {"generation": 3, "toplevel": gens.gen1, "rolled_back_to": 1}
    links = profile_links(gen1_root)
    assert links["system"] == "system-3-link" and links["system-3-link"] == gens.gen1
    assert read_activations(gen1_root) == [f"switch {gens.gen2}", f"switch {gens.gen1}"]
    assert status(gen1_root)["current"] == gens.gen1


def test_rollback_without_earlier_generation(gen1_root: str) -> None:
    before = snapshot(gen1_root)
    run = receive(gen1_root, None, "--rollback")
    assert_one_line_error(run, 23, "no-generation")
    assert snapshot(gen1_root) == before


def test_gc_keep_1(gens: Generations, streams: StreamCache, gen1_root: str) -> None:
    gen_to_2(gen1_root, gens, streams)
    run = receive(gen1_root, None, "--gc", "--keep", "1")
    assert run.returncode == 0, run.stderr
    only_old = set(gens.closure(gens.gen1)) - set(gens.closure(gens.gen2))
    assert only_old and gens.parts["data"] not in only_old
    result = run.json()
    assert sorted(result["deleted"]) == sorted(only_old)
    assert result["generations"] == [2]
    assert visible_paths(gen1_root) == set(gens.closure(gens.gen2))
    registered = {row[0] for row in db_rows(gen1_root)[0]}
    assert registered == set(gens.closure(gens.gen2))
    assert profile_links(gen1_root) == {"system": "system-2-link", "system-2-link": gens.gen2}
    assert_holds(gen1_root, gens, gens.gen2)
    # Nix agrees nothing of gen1's own paths is left.
    proc = subprocess.run(["nix", "path-info", "--store", gen1_root, gens.gen1], env=nix_env(),
                          capture_output=True, text=True, check=False)
    assert proc.returncode != 0


def test_activation_failure_rolls_back(gens: Generations, streams: StreamCache,
                                       gen1_root: str) -> None:
    run = receive(gen1_root, streams.get([gens.gen1], gens.gen3))
    assert_one_line_error(run, 20, "activation-failed", "rolled back to generation 1")
    assert profile_links(gen1_root) == {"system": "system-1-link", "system-1-link": gens.gen1}
    assert read_activations(gen1_root) == [f"switch {gens.gen3}", f"switch {gens.gen1}"]
    assert status(gen1_root)["current"] == gens.gen1
    assert_holds(gen1_root, gens, gens.gen1)
    # The new paths were verified and registered before the switch: a retry needs no data.
    assert_holds(gen1_root, gens, gens.gen3)


def test_registration_without_nix_tools(gens: Generations, streams: StreamCache,
                                        gen1_root: str, tmp_path: object) -> None:
    bare = os.path.join(str(tmp_path), "bin")
    os.makedirs(bare)
    env = {"PATH": bare, "HOME": str(tmp_path)}
    run = receive(gen1_root, streams.get([gens.gen1], gens.gen2), env=env)
    assert run.returncode == 0, run.stderr
    assert run.json()["generation"] == 2
    assert_holds(gen1_root, gens, gens.gen2)
    paths, refs = db_rows(gen1_root)
    assert {p for p, *_ in paths} == set(gens.closure(gens.gen1)) | set(gens.closure(gens.gen2))
    refs_of: dict[str, set[str]] = {}
    for a, b in refs:
        refs_of.setdefault(a, set()).add(b)
    info = json.loads(subprocess.run(["nix", "path-info", "--json", "-r", gens.gen2],
                                     env=nix_env(), capture_output=True, text=True,
                                     check=True).stdout)
    for item in info:
        assert refs_of.get(item["path"], set()) == set(item["references"]), item["path"]
