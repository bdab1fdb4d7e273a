"""Golden cases of reup.io.nix's command builders and output parsers, against Nix output captured
from Nix 2.8 and written in the newer layouts (tests/unit/fixtures/nix/README.md says how)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from reup.io.nix import (
    PathInfo,
    build_cmd,
    eval_json_cmd,
    parse_build_json,
    parse_path_info,
    parse_toplevels,
    path_info_cmd,
)
from reup_receiver.format.nar import parse_hash

FIXTURES = Path(__file__).parent / "fixtures" / "nix"
S = "/nix/store/"
APP, LIB = S + "7jb3k3qcwxp8arw344qny819c26z3k7h-reup-fixture-app-1", S + "q5bi4vhb8r3mpfkzz581czw4c3z9ap9m-reup-fixture-lib-1"
APP_DRV, LIB_DRV = S + "72sfh4n391d35qd5k8x6k8g7dn8fm654-reup-fixture-app-1.drv", S + "j853p85jarlxyncj33h9zbn7hzvni4v1-reup-fixture-lib-1.drv"
CLOSURE = [
    PathInfo(APP, "sha256-huOIANR6RXTCbse2G54ElUaFzPWIgte5F3msorbH2hk=", 176, (LIB,), APP_DRV),
    PathInfo(LIB, "sha256-rcU0Sek2slflcmv68/fyNuOQkC+bd7OGN3LsBFgjyHQ=", 120, (), LIB_DRV),
]


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


@pytest.mark.parametrize("name", ["path-info-2.8.json", "path-info-2.19.json", "path-info-basenames.json"])
def test_path_info_in_every_layout_parses_to_the_same_closure(name: str) -> None:
    got = sorted(parse_path_info(fixture(name)), key=lambda p: p.path)
    assert got == CLOSURE
    assert parse_hash(got[0].nar_hash).hex() == "86e38800d47a4574c26ec7b61b9e04954685ccf58882d7b91779aca2b6c7da19"  # nix hash to-base16


def test_paths_that_are_not_valid_are_left_out() -> None:
    assert parse_path_info(fixture("path-info-2.8-invalid.json")) == CLOSURE[:1]  # "valid": false
    assert APP in fixture("path-info-2.19.json") and "-nope\": null" in fixture("path-info-2.19.json")
    assert [p.path for p in parse_path_info(fixture("path-info-2.19.json"))] == [APP, LIB]  # null


def test_older_hash_notations_are_kept_as_printed() -> None:
    nix32 = "sha256:0x684dc09v3j6y3b6xwv5y891qrnybvz7ykbfbjmgcinx54k9idd"  # nix hash to-base32 of LIB's
    legacy = fixture("path-info-2.8.json").replace(CLOSURE[1].nar_hash, nix32)
    lib = [p for p in parse_path_info(legacy) if p.path == LIB]
    assert lib[0].nar_hash == nix32 and parse_hash(nix32) == parse_hash(CLOSURE[1].nar_hash)


@pytest.mark.parametrize("text", ['"x"', "3", '[{"path": "/nix/store/x"}]', '{"/nix/store/x": {"narSize": 1}}',
                                  '{"/nix/store/x": []}', "not json"])
def test_path_info_garbage_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        parse_path_info(text)


def test_build_json() -> None:
    assert parse_build_json(fixture("build-2.8.json")) == [{"out": APP}, {"out": LIB}]


def test_eval_json_of_the_fleet_toplevels() -> None:
    assert parse_toplevels(json.loads(fixture("eval-toplevels-2.8.json"))) == {
        "dev-1": (APP_DRV, APP), "dev-2": (LIB_DRV, LIB), "dev-3": None, "dev-4": None}


def test_command_builders() -> None:
    features = ["--extra-experimental-features", "nix-command flakes"]
    assert path_info_cmd([APP], recursive=True, store="/r") == [
        "nix", *features, "path-info", "--json", "--recursive", "--store", "/r", APP]
    assert build_cmd([APP_DRV], options={"sandbox": "false"}) == [
        "nix", *features, "build", "--json", "--no-link", "--option", "sandbox", "false", APP_DRV]
    assert eval_json_cmd("f#c", apply="x: x") == ["nix", *features, "eval", "--json", "f#c", "--apply", "x: x"]
