"""Golden cases for the delta engine's pure pairing functions (reup.delta.pairing)."""

from __future__ import annotations

import pytest
from reup.delta.pairing import (
    Graph,
    pair_files,
    pair_paths,
    parse_drv_name,
    rewrite_pairs,
    store_name,
)

H = "/nix/store/"


def p(hash_char: str, name: str) -> str:
    return H + hash_char * 32 + "-" + name


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("hello-2.12.1", ("hello", "2.12.1")),
        ("python3.11-numpy-1.26.4", ("python3.11-numpy", "1.26.4")),
        ("nixos-system-dev-23.11", ("nixos-system-dev", "23.11")),
        ("etc", ("etc", "")),
        ("system-path", ("system-path", "")),
        ("libsqlite3-0-3.40.1-2+deb12u2", ("libsqlite3", "0-3.40.1-2+deb12u2")),
    ],
)
def test_parse_drv_name(name: str, expected: tuple[str, str]) -> None:
    assert parse_drv_name(name) == expected


def test_store_name() -> None:
    assert store_name(p("a", "libfoo-1.5.6")) == "libfoo-1.5.6"


def _graph(refs: dict[str, list[str]], sizes: dict[str, int] | None = None) -> Graph:
    return Graph(refs, sizes or {k: 100 for k in refs})


def test_same_name_then_package_name() -> None:
    old_top, new_top = p("0", "system-g1"), p("1", "system-g2")
    old_lib, new_lib = p("a", "libfoo-1.5.5"), p("b", "libfoo-1.5.6")
    old_etc, new_etc = p("c", "etc"), p("d", "etc")
    new_only = p("e", "brand-new-1.0")
    old = _graph({old_top: [old_lib, old_etc], old_lib: [], old_etc: []})
    new = _graph({new_top: [new_lib, new_etc, new_only], new_lib: [], new_etc: [], new_only: []})
    pairs = pair_paths([new_top, new_lib, new_etc, new_only], new, [new_top], old, [old_top])
    # toplevels pair although their names differ; the rest by name, then by package name
    assert pairs == {new_top: old_top, new_lib: old_lib, new_etc: old_etc}


def test_graph_walk_disambiguates_duplicate_names() -> None:
    """Two old `config` paths: each new one pairs with the one at the same place in the graph."""
    old_top, new_top = p("0", "system"), p("1", "system")
    old_a, old_b = p("a", "svc-a"), p("b", "svc-b")
    old_ca, old_cb = p("c", "config"), p("d", "config")
    new_a, new_b = p("e", "svc-a"), p("f", "svc-b")
    new_ca, new_cb = p("g", "config"), p("h", "config")
    old = _graph({old_top: [old_a, old_b], old_a: [old_ca], old_b: [old_cb], old_ca: [], old_cb: []},
                 {old_top: 1, old_a: 1, old_b: 1, old_ca: 10, old_cb: 5000})
    new = _graph({new_top: [new_a, new_b], new_a: [new_ca], new_b: [new_cb], new_ca: [], new_cb: []},
                 {new_top: 1, new_a: 1, new_b: 1, new_ca: 6000, new_cb: 8})
    pairs = pair_paths([new_top, new_a, new_b, new_ca, new_cb], new, [new_top], old, [old_top])
    # sizes alone would cross them; the graph keeps each under its own service
    assert pairs[new_ca] == old_ca and pairs[new_cb] == old_cb


def test_ambiguous_without_graph_takes_closest_size() -> None:
    old1, old2 = p("a", "blob"), p("b", "blob")
    new1 = p("c", "blob")
    old = _graph({old1: [], old2: []}, {old1: 100, old2: 1000})
    new = _graph({new1: []}, {new1: 900})
    assert pair_paths([new1], new, [], old, []) == {new1: old2}


def test_rewrite_pairs_one_new_per_old() -> None:
    old = p("a", "x")
    pairs = {p("c", "x"): old, p("b", "x"): old}
    assert rewrite_pairs(pairs) == {old: p("b", "x")}


def test_pair_files_golden() -> None:
    old = [b"bin/tool", b"lib/libfoo.so.1.5.5", b"share/doc/foo-1.5.5/README", b"etc/a.conf",
           b"lib/libbar.so.2", b"deep/dir/unique.dat"]
    new = [b"bin/tool", b"lib/libfoo.so.1.5.6", b"share/doc/foo-1.5.6/README", b"etc/b.conf",
           b"lib/libbar.so.3", b"moved/unique.dat", b"brand-new"]
    assert pair_files(new, old, "1.5.6", "1.5.5") == {
        b"bin/tool": b"bin/tool",  # same path
        b"lib/libfoo.so.1.5.6": b"lib/libfoo.so.1.5.5",  # version substituted
        b"share/doc/foo-1.5.6/README": b"share/doc/foo-1.5.5/README",
        b"lib/libbar.so.3": b"lib/libbar.so.2",  # renamed soname: digits masked
        b"moved/unique.dat": b"deep/dir/unique.dat",  # same name elsewhere in the path
    }


def test_pair_files_ambiguous_mask_is_not_guessed() -> None:
    old = [b"lib/libx.so.1", b"lib/libx.so.2"]
    assert pair_files([b"lib/libx.so.3"], old, "", "") == {}
