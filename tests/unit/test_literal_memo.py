"""The controller's literal memo (delta/literalmemo.py, literal.py): files from paths an earlier
stream carried close an LZMA group of their own, whose bytes a later encode takes from the memo,
equal to compressing them again; other content (a store path rebuilt differently after a GC, so the
same file names with other bytes) never hits; the memo stays within its byte bound."""

from __future__ import annotations

import hashlib
import lzma
import os

from reup.delta.literal import MEMO_MIN, LiteralEncoder
from reup.delta.literalmemo import LiteralMemo, group_key
from reup_receiver.format.literal import LITERAL_LZMA_X86, LITERAL_ZSTD, dict_log_for, lzma_filters


def _files(d: str, contents: dict[str, bytes]) -> list[tuple[bytes, int, bytes]]:
    out = []
    for name, data in contents.items():
        path = os.path.join(d, name)
        with open(path, "wb") as fh:
            fh.write(data)
        out.append((path.encode(), len(data), hashlib.sha256(data).digest()))
    return out


SHARED = {"base": b"".join(b"%d base 1\n" % i for i in range(4000)), "lib": b"shared library text\n" * 500}


def _datas(enc: LiteralEncoder, files: list[tuple[bytes, int, bytes]]) -> list[bytes]:
    return [enc.data(p) for p, _, _ in files]


def test_shared_files_form_a_group_the_next_encode_reuses(tmp_path: os.PathLike[str]) -> None:
    memo = LiteralMemo()
    files_a = _files(str(tmp_path), {**SHARED, "host-a": b"device a\n"})
    assert sum(s for _, s, _ in files_a[:2]) >= MEMO_MIN
    first = LiteralEncoder(elf=False, memo=memo)
    first.plan(files_a, shared=2)
    assert first.codec == LITERAL_LZMA_X86  # small, but the shared part is worth its own group
    data_a = _datas(first, files_a)
    assert data_a[1] == b"" and data_a[2] != b""  # two groups: the shared one, then the device's own
    assert (memo.hits, memo.misses) == (0, 1)
    # The group is raw LZMA2 of the shared files' content, after one dictionary-size byte.
    content = SHARED["base"] + SHARED["lib"]
    assert data_a[0][0] == dict_log_for(len(content))
    dec = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=lzma_filters(data_a[0][0], LITERAL_LZMA_X86))
    assert dec.decompress(data_a[0][1:]) == content

    b_dir = os.path.join(tmp_path, "b")
    os.mkdir(b_dir)
    files_b = _files(b_dir, {**SHARED, "host-b": b"device b\n"})
    second = LiteralEncoder(elf=False, memo=memo)
    second.plan(files_b, shared=2)
    data_b = _datas(second, files_b)
    assert (memo.hits, memo.misses) == (1, 1) and data_b[0] == data_a[0]
    fresh = LiteralEncoder(elf=False, memo=LiteralMemo())  # compressed again: the very same bytes
    fresh.plan(files_b, shared=2)
    assert _datas(fresh, files_b) == data_b


def test_other_content_under_the_same_names_never_hits(tmp_path: os.PathLike[str]) -> None:
    memo = LiteralMemo()
    files = _files(str(tmp_path), SHARED)
    enc = LiteralEncoder(elf=False, memo=memo)
    enc.plan(files, shared=2)
    before = _datas(enc, files)
    rebuilt = _files(str(tmp_path), {"base": SHARED["base"].replace(b"base 1", b"base 2"), "lib": SHARED["lib"]})
    again = LiteralEncoder(elf=False, memo=memo)
    again.plan(rebuilt, shared=2)
    after = _datas(again, rebuilt)
    assert (memo.hits, memo.misses) == (0, 2) and after[0] != before[0]


def test_without_a_memo_or_shared_files_nothing_changes(tmp_path: os.PathLike[str]) -> None:
    files = _files(str(tmp_path), {**SHARED, "host": b"device\n"})
    for enc, shared in ((LiteralEncoder(elf=False), 2), (LiteralEncoder(elf=False, memo=LiteralMemo()), 0)):
        enc.plan(files, shared=shared)
        assert enc.codec == LITERAL_ZSTD  # below LZMA_MIN: one zstd stream, as for a single device
    small = _files(str(tmp_path), {"tiny": b"x" * 100, "host": b"device\n"})
    enc = LiteralEncoder(elf=False, memo=LiteralMemo())
    enc.plan(small, shared=1)  # too little shared content to be worth a group
    assert enc.codec == LITERAL_ZSTD


def test_the_memo_keeps_its_bounds() -> None:
    memo = LiteralMemo(max_bytes=1000, max_paths=2)
    keys = [group_key(1, 16, [bytes([i]) * 32]) for i in range(3)]
    for key in keys:
        memo.put(key, b"x" * 400)
    assert memo.get(keys[0]) is None and memo.get(keys[2]) == b"x" * 400  # the oldest went first
    memo.put(group_key(1, 16, [b"big" * 11]), b"y" * 2000)  # larger than the whole memo: not kept
    assert memo.get(group_key(1, 16, [b"big" * 11])) is None
    memo.note(["/nix/store/a", "/nix/store/b", "/nix/store/c"])
    assert not memo.seen("/nix/store/a") and memo.seen("/nix/store/c")
    assert group_key(1, 16, [b"a" * 32]) != group_key(2, 16, [b"a" * 32]) != group_key(1, 17, [b"a" * 32])
