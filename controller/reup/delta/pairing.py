"""Pairing: which old store path each new one replaces, and which old file each new file.

Pure functions over names and reference graphs, golden-tested in
tests/unit/test_delta_pairing.py. Path pairing walks the reference graphs from the
toplevels in step (so two old paths with the same name are told apart by
where they hang), then falls back to a unique match by full name, then by
package name without version; remaining ties go to the candidate with the
closest NAR size, deterministically. File pairing tries the same relative
path, then the path with the version string substituted, then the same name
with the digits masked (sonames), then the same base name anywhere in the path.
Called by strategy.py.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

HASH_LEN = 32
_VERSION_START = re.compile(r"-(?=[0-9])")
_DIGITS = re.compile(rb"[0-9]+")


def store_name(path: str) -> str:
    """`/nix/store/<hash>-foo-1.2` -> `foo-1.2`."""
    return path.rsplit("/", 1)[-1][HASH_LEN + 1 :]


def parse_drv_name(name: str) -> tuple[str, str]:
    """Nix's builtins.parseDrvName: the version starts at the first dash followed by a digit."""
    m = _VERSION_START.search(name)
    if not m:
        return name, ""
    return name[: m.start()], name[m.end() :]


@dataclass(frozen=True)
class Graph:
    """Store paths with their references and NAR sizes."""

    refs: Mapping[str, Sequence[str]]
    sizes: Mapping[str, int]


def pair_paths(
    new: Iterable[str],
    new_graph: Graph,
    new_roots: Sequence[str],
    old_graph: Graph,
    old_roots: Sequence[str],
) -> dict[str, str]:
    """Map each new path (that has a plausible predecessor) to the old path it replaces."""
    wanted = set(new)
    old_paths = set(old_graph.refs)
    pairs: dict[str, str] = {}
    taken: set[str] = set()

    def candidates(n: str, pool: Iterable[str]) -> list[str]:
        name = store_name(n)
        exact = sorted(o for o in pool if store_name(o) == name and o not in taken)
        if exact:
            return exact
        pname = parse_drv_name(name)[0]
        return sorted(o for o in pool if parse_drv_name(store_name(o))[0] == pname and o not in taken)

    def closest(n: str, cands: Sequence[str]) -> str:
        size = new_graph.sizes.get(n, 0)
        return min(cands, key=lambda o: (abs(old_graph.sizes.get(o, 0) - size), o))

    # 1. Walk both graphs in step from the toplevels: structure disambiguates names.
    queue: deque[tuple[str, str]] = deque()
    held_roots = [o for o in old_roots if o in old_paths]
    for root in new_roots:
        cands = candidates(root, held_roots)
        if cands:
            queue.append((root, closest(root, cands)))
        elif held_roots:  # system toplevels pair even when their names differ
            queue.append((root, held_roots[0]))
    visited: set[tuple[str, str]] = set()
    while queue:
        n, o = queue.popleft()
        if (n, o) in visited or n in pairs or o in taken:
            continue
        visited.add((n, o))
        if n in wanted:
            pairs[n] = o
            taken.add(o)
        for rn in sorted(new_graph.refs.get(n, ())):
            if rn in pairs or rn == n:
                continue
            cands = candidates(rn, [r for r in old_graph.refs.get(o, ()) if r != o and r in old_paths])
            if len(cands) == 1 or (cands and len({store_name(c) for c in cands}) == 1):
                queue.append((rn, closest(rn, cands)))

    # 2. Whatever the walk did not reach: unique name, then package name, then closest size.
    for n in sorted(wanted - set(pairs)):
        cands = candidates(n, old_paths)
        if cands:
            o = closest(n, cands)
            pairs[n] = o
            taken.add(o)
    return pairs


def pair_files(
    new_files: Sequence[bytes],
    old_files: Sequence[bytes],
    new_version: str,
    old_version: str,
) -> dict[bytes, bytes]:
    """Map new relative paths to old relative paths of a paired store path."""
    old_set = set(old_files)
    out: dict[bytes, bytes] = {}
    by_mask: dict[tuple[bytes, bytes], list[bytes]] = {}
    by_base: dict[bytes, list[bytes]] = {}
    for rel in old_files:
        d, _, base = rel.rpartition(b"/")
        by_mask.setdefault((d, _DIGITS.sub(b"#", base)), []).append(rel)
        by_base.setdefault(base, []).append(rel)
    nv, ov = new_version.encode(), old_version.encode()
    for rel in new_files:
        if rel in old_set:
            out[rel] = rel
            continue
        if nv and ov and nv != ov and nv in rel:
            sub = rel.replace(nv, ov)
            if sub in old_set:
                out[rel] = sub
                continue
        d, _, base = rel.rpartition(b"/")
        masked = by_mask.get((d, _DIGITS.sub(b"#", base)), [])
        if len(masked) == 1:
            out[rel] = masked[0]
            continue
        same_base = by_base.get(base, [])
        if len(same_base) == 1:
            out[rel] = same_base[0]
    return out


def rewrite_pairs(pairs: Mapping[str, str]) -> dict[str, str]:
    """The old->new hash rewrite map: one new path per old path (the first by name wins)."""
    out: dict[str, str] = {}
    for n in sorted(pairs):
        o = pairs[n]
        out.setdefault(o, n)
    return out
