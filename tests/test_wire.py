"""The wire contract: codecs, shards, messages, topics (sans-IO, property-based)."""

from __future__ import annotations

import math

import cbor2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedsync.codecs import get_codec
from fedsync.errors import ProtocolError
from fedsync.messages import (MAX_PAYLOAD, ModelShard, PeerStatus, RoundManifest, ShardAck, UpdateShard, decode,
                              encode)
from fedsync.params import (bitmap, bitmap_indices, digest, flatten, shard_slices, spec_of, unflatten,
                            update_digest)
from fedsync.topics import Topics

finite_f32 = arrays(np.float32, st.integers(1, 3000),
                    elements=st.floats(allow_nan=False, allow_infinity=False, width=32))
fp16_range = arrays(np.float32, st.integers(1, 3000),
                    elements=st.floats(-60000.0, 60000.0, allow_nan=False, allow_infinity=False, width=32))


@pytest.mark.parametrize("name", ["raw", "zstd"])
@given(values=finite_f32)
@settings(max_examples=60, deadline=None)
def test_lossless_codecs_round_trip_bit_exact(name, values):
    c = get_codec(name)
    out = c.decode(c.encode(values), values.size)
    assert out.dtype == np.float32
    assert out.tobytes() == values.tobytes()


@given(values=fp16_range)
@settings(max_examples=60, deadline=None)
def test_fp16_within_stated_error(values):
    c = get_codec("fp16")
    out = c.decode(c.encode(values), values.size)
    assert np.all(np.abs(out - values) <= c.error_bound(values))


@pytest.mark.parametrize("name", ["raw", "zstd", "fp16"])
@given(junk=st.binary(max_size=300), length=st.integers(1, 100))
@settings(max_examples=80, deadline=None)
def test_codecs_raise_only_protocol_error_on_junk(name, junk, length):
    try:
        out = get_codec(name).decode(junk, length)
    except ProtocolError as err:
        assert err.field == "data"
    else:
        assert out.size == length and np.isfinite(out).all()


def test_codec_rejects_nan_and_wrong_length():
    raw = get_codec("raw")
    with pytest.raises(ProtocolError, match="not_finite"):
        raw.decode(np.array([1.0, np.nan], np.float32).tobytes(), 2)
    z = get_codec("zstd")
    with pytest.raises(ProtocolError, match="size"):
        z.decode(z.encode(np.ones(10, np.float32)), 11)
    with pytest.raises(ProtocolError, match="codec: unknown"):
        get_codec("gzip")


@given(shapes=st.lists(st.lists(st.integers(1, 7), min_size=0, max_size=3), min_size=1, max_size=5))
def test_flatten_unflatten_round_trip(shapes):
    rng = np.random.default_rng(0)
    params = {f"p{i}": rng.normal(size=s).astype(np.float32) for i, s in enumerate(shapes)}
    spec = spec_of(params)
    back = unflatten(flatten(params), spec)
    assert set(back) == set(params)
    for k in params:
        assert back[k].shape == params[k].shape and np.array_equal(back[k], params[k])


@given(n=st.integers(1, 10_000), per=st.integers(1, 3000))
def test_shard_slices_tile_the_vector(n, per):
    slices = shard_slices(n, per)
    assert len(slices) == math.ceil(n / per)
    assert sum(length for _, length in slices) == n
    assert all(off == i * per for i, (off, _) in enumerate(slices))


@given(indices=st.sets(st.integers(0, 99)), count=st.just(100))
def test_bitmap_round_trip(indices, count):
    assert bitmap_indices(bitmap(indices, count), count) == sorted(indices)


def _shard(**over) -> UpdateShard:
    data = get_codec("raw").encode(np.ones(4, np.float32))
    base = dict(device="dev-1", round_id=3, update_id="u1", base_version=2, index=0, count=2, offset=0, length=4,
                num_params=8, codec="raw", num_samples=10, digest=digest(data), update_digest=b"\0" * 16,
                data=data, metrics={"train_loss": 0.5})
    base.update(over)
    return UpdateShard(**base)


def test_every_message_round_trips():
    m = RoundManifest("demo", 1, 7, "open", "sync", 0, b"\1" * 16, "zstd", 1, (("b", (10,)), ("w", (60, 10))),
                      610, 65536, "zstd", 1, 100.0, 40.0, 2, 3, ("dev-0", "dev-1", "dev-2"), {"lr": 0.1})
    for msg in (m, _shard(), PeerStatus("dev-1", "offline"), ShardAck("dev-1", 3, "u1", 9, b"\xff\x01", "partial"),
                ModelShard(0, 0, 1, 0, 4, 4, "raw", b"\2" * 16, b"\0" * 16)):
        assert decode(encode(msg), type(msg)) == msg


def _mutate(msg, **fields) -> bytes:
    body = cbor2.loads(encode(msg))
    body.update(fields)
    return cbor2.dumps(body)


@pytest.mark.parametrize("fields, field, reason", [
    ({"round_id": "3"}, "round_id", "type"),
    ({"round_id": -1}, "round_id", "range"),
    ({"num_samples": 0}, "num_samples", "range"),
    ({"num_samples": True}, "num_samples", "type"),
    ({"digest": b"short"}, "digest", "size"),
    ({"device": "dev/1"}, "device", "format"),
    ({"device": "+"}, "device", "format"),
    ({"index": 2}, "index", "range"),
    ({"offset": 6}, "length", "range"),
    ({"metrics": {"loss": float("nan")}}, "metrics[loss]", "not_finite"),
    ({"v": 2}, "v", "schema_version"),
    ({"t": "bogus"}, "t", "value"),
    ({"extra": 1}, "extra", "unknown_field"),
])
def test_wrong_fields_raise_protocol_error_naming_the_field(fields, field, reason):
    with pytest.raises(ProtocolError) as exc:
        decode(_mutate(_shard(), **fields), UpdateShard)
    assert (exc.value.field, exc.value.reason) == (field, reason)


def test_missing_field_and_wrong_kind():
    body = cbor2.loads(encode(_shard()))
    del body["digest"]
    with pytest.raises(ProtocolError) as exc:
        decode(cbor2.dumps(body))
    assert (exc.value.field, exc.value.reason) == ("digest", "missing")
    with pytest.raises(ProtocolError) as exc:
        decode(encode(PeerStatus("x", "online")), UpdateShard)
    assert exc.value.field == "t"


@pytest.mark.parametrize("payload, reason", [
    (b"", "empty"),
    (b"\xff\xfe\xfd", "cbor"),
    (cbor2.dumps([1, 2, 3]), "type"),
    (b"\xbf", "cbor"),  # truncated indefinite map
    (b"\0" * (MAX_PAYLOAD + 1), "size"),
])
def test_malformed_payloads(payload, reason):
    with pytest.raises(ProtocolError) as exc:
        decode(payload)
    assert exc.value.reason == reason


@given(st.binary(max_size=200))
@settings(max_examples=300)
def test_decode_never_raises_anything_else(junk):
    try:
        decode(junk)
    except ProtocolError:
        pass


def test_manifest_cross_field_rules():
    good = RoundManifest("demo", 1, 7, "open", "sync", 0, b"\1" * 16, "zstd", 1, (("w", (2, 2)),), 4, 10, "zstd",
                         1, 100.0, 40.0, 1, 1, ("dev-0",))
    with pytest.raises(ProtocolError) as exc:
        decode(_mutate(good, num_params=5), RoundManifest)
    assert exc.value.field == "num_params"
    with pytest.raises(ProtocolError) as exc:
        decode(_mutate(good, quorum=2), RoundManifest)
    assert exc.value.field == "quorum"


def test_topics_parse_and_reject():
    t = Topics("demo")
    up = t.parse_up(t.up("dev-1", 4, "uabc", 2))
    assert (up.device, up.round_id, up.update_id, up.shard) == ("dev-1", 4, "uabc", 2)
    for bad in ["fedsync/demo/up/dev-1/4/uabc", "fedsync/other/up/dev-1/4/u/2", "fedsync/demo/up/dev-1/x/u/2",
                "fedsync/demo/up/d+/4/u/2"]:
        with pytest.raises(ProtocolError):
            t.parse_up(bad)
    kw = dict(federation="demo", device="dev-1", round_id=4, update_id="uabc", base_version=3, base_digest=b"\x01" * 16)
    assert update_digest([b"a" * 16], **kw) != update_digest([b"b" * 16], **kw)
    moved = [dict(kw, federation="other"), dict(kw, device="dev-2"), dict(kw, round_id=5), dict(kw, update_id="uabd"),
             dict(kw, base_version=2), dict(kw, base_digest=b"\x02" * 16)]
    assert len({update_digest([b"a" * 16], **k) for k in [kw, *moved]}) == 7  # every field is bound


def test_zstd_frame_claiming_a_huge_size_is_refused_before_allocating():
    # A 29-byte zstd frame whose header claims 1 TiB: single segment, 8-byte content size,
    # one raw block of 16 zero bytes. Without the header check zstandard tries to allocate it.
    block = (1 | (16 << 3)).to_bytes(3, "little")
    bomb = b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + (1 << 40).to_bytes(8, "little") + block + bytes(16)
    for name in ("zstd", "fp16"):
        with pytest.raises(ProtocolError) as exc:
            get_codec(name).decode(bomb, 4)
        assert (exc.value.field, exc.value.reason) == ("data", "size")


def test_a_tag_is_refused_by_its_field_with_the_reason_the_docs_quote():
    body = cbor2.loads(encode(PeerStatus("dev-1", "online")))
    assert decode(cbor2.dumps(body), PeerStatus) == PeerStatus("dev-1", "online")  # positive control
    for tagged in (cbor2.CBORTag(64, b"x"), cbor2.CBORTag(28, "dev-1"), cbor2.CBORTag(55799, "dev-1")):
        with pytest.raises(ProtocolError) as err:
            decode(cbor2.dumps({**body, "peer": tagged}), PeerStatus)
        assert str(err.value) == f"peer: type (CBOR tag {tagged.tag}; values are untagged)"


def test_hostile_nesting_under_a_field_is_a_protocol_error_not_a_crash():
    # 200,000 nested arrays: the strict pre-pass walks iteratively, cbor2 then refuses it.
    payload = b"\xa1\x61a" + b"\x81" * 200_000 + b"\x00"
    with pytest.raises(ProtocolError) as err:
        decode(payload)
    assert (err.value.field, err.value.reason) == ("payload", "cbor")


@pytest.mark.parametrize("name", ["zstd", "fp16", "int8", "topk", "topk1"])
def test_bytes_after_the_zstd_frame_are_refused_not_ignored(name):
    codec = get_codec(name)
    values = np.linspace(-1, 1, 4096, dtype=np.float32)
    data = codec.encode(values)
    assert codec.decode(data, values.size).shape == (4096,)  # positive control: the frame alone decodes
    for tail in (b"\x00", data):  # one junk byte; a second whole frame
        with pytest.raises(ProtocolError) as err:
            codec.decode(data + tail, values.size)
        assert (err.value.field, err.value.reason, err.value.detail) == (
            "data", "trailing", f"{len(tail)} bytes after the zstd frame")
    with pytest.raises(ProtocolError) as err:  # and a frame cut short is still a codec error
        codec.decode(data[:-3], values.size)
    assert (err.value.field, err.value.reason) == ("data", "codec")
