"""Issue 13, a cheaper manifest: the version-2 manifest and mirror encodings (format/manifest2.py).

- Round trip for random manifests: known paths the device holds travel as short ids and come
  back as the full names, the others by full name; new names by reference to earlier ones.
- A short id the device does not hold, or that matches two of its paths, is refused as a
  missing base; a short id resolving to another path than the encoder's changes the names
  block the trailer digest covers.
- Hostile manifests and mirrors stay bounded: huge counts are refused before anything of
  their size is allocated.
- Version-2 mirrors round-trip: specs without per-file hashes, COPYs as runs.
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reup_receiver.errors import Corrupt, MissingBase, Oversized, ReceiveError, Unsupported
from reup_receiver.format.entries import MAX_MIRROR_FILES, UNCHECKED_COPY, EntryCoder
from reup_receiver.format.manifest2 import (
    MIN_ID_CHARS,
    decode_manifest_v2,
    encode_body,
    id_chars_for,
    manifest_payload,
    names_block,
    sized_payload,
)
from reup_receiver.format.model import (
    KIND_MIRROR,
    Codec,
    Entry,
    Manifest,
    Method,
    MirrorFile,
    PathEntry,
)
from reup_receiver.format.wire import put_varint, stream_size

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"
nix32 = st.text(alphabet=NIX32, min_size=32, max_size=32)
stems = st.sampled_from(["libfoo-1.5.5", "libfoo-1.5.6", "etc", "system-path", "nixos-system-dev-g1", "a"])
store_names = st.tuples(nix32, stems).map(lambda t: f"{t[0]}-{t[1]}".encode())


@st.composite
def cases(draw: st.DrawFn) -> tuple[Manifest, set[bytes]]:
    """A manifest and the device's holdings (the known paths it holds, and some others)."""
    names = draw(st.lists(store_names, min_size=1, max_size=10, unique_by=lambda n: n[:32]))
    n_new = draw(st.integers(0, len(names)))
    table_len = len(names)
    paths = [PathEntry(
        name=names[i],
        nar_hash=draw(st.binary(min_size=32, max_size=32)),
        nar_size=draw(st.integers(0, 2**40)),
        references=tuple(sorted(set(draw(st.lists(st.integers(0, table_len - 1), max_size=5))))),
        carried=draw(st.booleans()),
        replace=draw(st.booleans()),
    ) for i in range(n_new)]
    known = names[n_new:]
    held = {n for n in known if draw(st.booleans())}
    others = draw(st.lists(store_names, max_size=6))
    store = draw(st.sampled_from([b"/nix/store", b"/data/store"]))
    m = Manifest(store, known, paths, draw(st.integers(0, table_len - 1)),
                 draw(st.lists(st.tuples(st.integers(0, table_len - 1), st.integers(0, table_len - 1)),
                               max_size=3)),
                 0, draw(st.integers(0, 1)))
    return m, held | {o for o in others if o[:32] not in {n[:32] for n in names}}


def round_trip(m: Manifest, holdings: set[bytes], device: set[bytes] | None = None) -> Manifest:
    payload, size = sized_payload(encode_body(m, holdings), 1000)
    decoded = decode_manifest_v2(payload, lambda: sorted(holdings if device is None else device))
    assert decoded.stream_bytes == size == stream_size(len(payload), 1000)
    return decoded


@SETTINGS
@given(cases())
def test_round_trip(case: tuple[Manifest, set[bytes]]) -> None:
    m, holdings = case
    decoded = round_trip(m, holdings)
    # derivers are not part of version 2; everything else comes back as it was
    assert decoded == dataclasses.replace(m, stream_bytes=decoded.stream_bytes)
    assert names_block(decoded) == names_block(m)


def known_only(names: list[bytes]) -> Manifest:
    return Manifest(b"/nix/store", names, [], 0)


NAME = b"gk1y2mwa1ljahf6j4x0f9ykpw7ylz3ab-libfoo-1.5.6"
CLASH = NAME[:MIN_ID_CHARS] + b"00000000000000000000000a-other"  # same short id, another path


def test_short_ids_are_short_and_resolve_on_the_device() -> None:
    payload = manifest_payload(0, encode_body(known_only([NAME]), {NAME}))
    assert len(payload) < 20  # vs 20 hash bytes + the name in version 1
    assert decode_manifest_v2(payload, lambda: [b"x" * 40, NAME]).known == [NAME]


def test_absent_short_id_is_a_missing_base() -> None:
    payload = manifest_payload(0, encode_body(known_only([NAME]), {NAME}))
    with pytest.raises(MissingBase, match=NAME[:MIN_ID_CHARS].decode()):
        decode_manifest_v2(payload, lambda: [b"0" * 32 + b"-libfoo-1.5.6"])


def test_ambiguous_short_id_is_a_missing_base() -> None:
    payload = manifest_payload(0, encode_body(known_only([NAME]), {NAME}))
    with pytest.raises(MissingBase, match="ambiguous"):
        decode_manifest_v2(payload, lambda: [NAME, CLASH])


def test_encoder_lengthens_ids_past_the_paths_it_knows() -> None:
    assert id_chars_for([NAME], {NAME}) == MIN_ID_CHARS
    longer = id_chars_for([NAME], {NAME, CLASH})
    assert longer > MIN_ID_CHARS and NAME[:longer] != CLASH[:longer]
    payload = manifest_payload(0, encode_body(known_only([NAME]), {NAME, CLASH}))
    assert decode_manifest_v2(payload, lambda: [CLASH, NAME]).known == [NAME]


def test_a_short_id_resolving_to_another_path_changes_the_digested_names() -> None:
    """The device lost NAME and holds CLASH under the same id: the id resolves, but the names
    block (folded into the trailer digest) differs, so the stream is refused at its trailer."""
    m = known_only([NAME])
    payload = manifest_payload(0, encode_body(m, {NAME}))
    wrong = decode_manifest_v2(payload, lambda: [CLASH])
    assert wrong.known == [CLASH] and names_block(wrong) != names_block(m)


def test_corrupt_short_id_is_refused() -> None:
    body = bytearray(encode_body(known_only([NAME]), {NAME}))
    body[5] ^= 1  # flags, id chars, n_known, bitset, then the id: now another path's id
    with pytest.raises(MissingBase):
        decode_manifest_v2(manifest_payload(0, bytes(body)), lambda: [NAME, CLASH])
    body = bytearray(encode_body(known_only([NAME]), {NAME, CLASH}))
    assert body[1] == MIN_ID_CHARS + 1  # 45 bits in 6 bytes: some values are no id
    body[4:10] = b"\xff" * 6
    with pytest.raises(Corrupt, match="out of range"):
        decode_manifest_v2(manifest_payload(0, bytes(body)), lambda: [NAME])
    body = bytearray(encode_body(known_only([NAME]), {NAME}))
    body[1] = 3  # an id length below the minimum
    with pytest.raises(Corrupt):
        decode_manifest_v2(manifest_payload(0, bytes(body)), lambda: [NAME])


def hostile_body(n_known: int, tail: bytes = b"") -> bytes:
    body = bytearray([0, MIN_ID_CHARS])
    put_varint(body, n_known)
    return bytes(body) + tail


@pytest.mark.parametrize("count", [2**20, 2**40, 2**62])
def test_hostile_counts_are_refused_without_allocating(count: int) -> None:
    calls = []

    def holdings() -> list[bytes]:
        calls.append(1)
        return [NAME]

    with pytest.raises(Corrupt):  # the bitset of `count` bits is not there
        decode_manifest_v2(manifest_payload(0, hostile_body(count)), holdings)
    # a path claiming `count` references
    body = bytearray(hostile_body(0))
    put_varint(body, 1)
    body += bytes(20)
    put_varint(body, 0)
    body += b"\x02-a" + bytes(32) + b"\x01"
    put_varint(body, count << 2)
    with pytest.raises(Corrupt):
        decode_manifest_v2(manifest_payload(0, bytes(body)), holdings)
    assert not calls  # nothing resolved, no index of the device's paths built


def test_hostile_zstd_manifest_is_bounded() -> None:
    import zstandard

    bomb = zstandard.ZstdCompressor(level=3).compress(bytes(80 << 20))
    payload = bytearray()
    put_varint(payload, 0)
    payload += b"\x01" + bomb
    with pytest.raises(Oversized):
        decode_manifest_v2(bytes(payload), lambda: [])


def mirror(specs: list[MirrorFile]) -> Entry:
    return Entry(KIND_MIRROR, b"", flags=2, source=1, mirror=tuple(specs), skip=(b"a", b"a/b"))


SHA = bytes(range(16))


def test_v2_mirror_round_trip_and_copy_runs() -> None:
    copy = MirrorFile(Method.COPY, SHA)
    specs = [copy] * 3 + [MirrorFile(Method.PATCH, SHA, 10, Codec.ZSTD_PREFIX, 4), copy,
                          MirrorFile(Method.LITERAL, SHA, 5, None, 3)] + [copy] * 200
    table = [NAME, CLASH]
    payload = EntryCoder(table, version=2).encode(mirror(specs))
    decoded = EntryCoder(table, version=2).decode(payload)
    want = [UNCHECKED_COPY if s.method == Method.COPY else dataclasses.replace(s, sha256=b"") for s in specs]
    assert decoded == dataclasses.replace(mirror(specs), mirror=tuple(want))
    assert len(payload) < 25  # two specs of three bytes, the COPYs three runs of a byte each
    assert len(EntryCoder(table).encode(mirror(specs))) > 17 * len(specs)  # version 1: a hash each


def test_hostile_v2_mirrors_are_bounded() -> None:
    coder = EntryCoder([NAME, CLASH], version=2)
    head = bytearray([KIND_MIRROR])
    put_varint(head, 0)
    head += b"\x00\x00"  # flags, no skips
    huge = bytearray(head)
    put_varint(huge, MAX_MIRROR_FILES + 1)
    put_varint(huge, MAX_MIRROR_FILES + 1)
    with pytest.raises(Corrupt, match="limit"):
        coder.decode(bytes(huge))
    long_run = bytearray(head)
    put_varint(long_run, 3)
    long_run.append(0x80 | 3)  # a run of 4 COPYs
    with pytest.raises(Corrupt, match="run"):
        coder.decode(bytes(long_run))
    unknown = bytearray(head)
    put_varint(unknown, 1)
    unknown += b"\x7f\x01\x01"  # codec 127
    with pytest.raises(Unsupported):
        coder.decode(bytes(unknown))
    cut = bytearray(head)
    put_varint(cut, 1)
    cut += bytes([Codec.ZSTD_PREFIX])  # its size and data length are missing
    with pytest.raises(Corrupt):
        coder.decode(bytes(cut))


@SETTINGS
@given(cases(), st.data())
def test_damaged_manifests_fail_only_as_refusals(case: tuple[Manifest, set[bytes]], data: st.DataObject) -> None:
    """Any flipped or cut byte: the manifest decodes to something (the trailer digest catches
    that), or is refused with a receiver error; never another exception."""
    m, holdings = case
    payload = bytearray(manifest_payload(0, encode_body(m, holdings)))
    at = data.draw(st.integers(0, len(payload) - 1))
    if data.draw(st.booleans()):
        payload[at] ^= data.draw(st.integers(1, 255))
    else:
        del payload[at:]
    with contextlib.suppress(ReceiveError):
        decode_manifest_v2(bytes(payload), lambda: sorted(holdings))


def test_controller_maps_a_refused_short_id_back_to_the_held_path() -> None:
    """The receiver cannot name a path it lacks; the controller finds it by its short id among
    what it believed the device held, and re-encodes without it (not a whole stream)."""
    from reup.io.answers import BrokenBaseError, receive_refused

    payload = manifest_payload(0, encode_body(known_only([NAME]), {NAME}))
    with pytest.raises(MissingBase) as refused:
        decode_manifest_v2(payload, lambda: [])
    stderr = f"reup-receive: {refused.value.kind}: {refused.value}\n"
    held = [f"/nix/store/{n.decode()}" for n in (NAME, b"0" * 32 + b"-other")]
    err = receive_refused(refused.value.exit_code, stderr, held)
    assert isinstance(err, BrokenBaseError) and err.path == held[0]
    with pytest.raises(MissingBase) as ambiguous:
        decode_manifest_v2(payload, lambda: [NAME, CLASH])
    stderr = f"reup-receive: {ambiguous.value.kind}: {ambiguous.value}\n"
    err = receive_refused(ambiguous.value.exit_code, stderr, [*held, f"/nix/store/{CLASH.decode()}"])
    assert isinstance(err, BrokenBaseError) and err.path is None  # two held paths have that id
