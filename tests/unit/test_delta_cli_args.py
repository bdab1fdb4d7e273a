"""`reup delta`'s list flags accumulate when repeated (issue 13): `--from A --from B` is `--from A B`."""

from __future__ import annotations

import pytest
from reup.cli.main import build_parser


@pytest.mark.parametrize("flag,dest", [("--from", "held"), ("--staged", "staged"), ("--avoid", "avoid")])
def test_repeated_list_flags_accumulate(flag: str, dest: str) -> None:
    parser = build_parser()
    base = ["delta", "--to", "/nix/store/t", "-o", "out"]
    repeated = parser.parse_args(base + [flag, "A", flag, "B", "C"])
    together = parser.parse_args(base + [flag, "A", "B", "C"])
    assert getattr(repeated, dest) == ["A", "B", "C"]
    assert getattr(together, dest) == ["A", "B", "C"]


def test_absent_list_flags_are_empty() -> None:
    args = build_parser().parse_args(["delta", "--to", "/nix/store/t", "-o", "out"])
    assert (args.held, args.staged, args.avoid) == ([], [], [])
