"""The coordinator's ingest fast paths against the slow paths they replace.

Each fast path must agree with the library code it stands in for: cborview with
cbor2, paho_fast with paho's own decode_publish, Codec.decode_to with
Codec.decode, the journal's payload-in-place record with cbor2's encoding, the
chunked FedAvg with the reference weighted mean.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
from pathlib import Path

import cbor2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt import _packet
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket

from fedsync.coordinator.aggregate import FedAvg, weighted_mean
from fedsync.coordinator.journal import Journal, _bytes_head
from fedsync import cborview
from fedsync.transport import paho_fast
from fedsync.codecs import get_codec
from fedsync.errors import ProtocolError
from fedsync.messages import UpdateShard, decode, encode
from fedsync.params import digest, shards_digest

ROOT = Path(__file__).resolve().parent.parent

# -- cborview vs cbor2 ----------------------------------------------------------------------------

scalars = (st.integers(-2**64 + 1, 2**64 - 1) | st.floats(allow_nan=False) | st.booleans() | st.none()
           | st.text(max_size=40) | st.binary(max_size=64)
           | st.binary(min_size=cborview.VIEW_MIN, max_size=cborview.VIEW_MIN + 100))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5)
                      | st.dictionaries(st.text(max_size=12), inner, max_size=5), max_leaves=30)


def plain(v):
    """cborview's result in cbor2's terms: memoryviews as bytes."""
    if isinstance(v, memoryview):
        return v.tobytes()
    if isinstance(v, list):
        return [plain(x) for x in v]
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    return v


def same(a, b) -> bool:
    """Exactly the same decoded value: same types (True is not 1), floats bit for bit (a NaN
    equals only the same NaN, -0.0 is not 0.0), lists and maps element by element in order."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return a == b


def test_same_tells_apart_what_equality_does_not():
    nan = float("nan")
    assert same([1.5, {"a": b"x"}], [1.5, {"a": b"x"}]) and same(nan, nan)
    assert [nan] != [float("nan")] and not same(nan, struct.unpack("<d", b"\x01\x00\x00\x00\x00\x00\xf8\x7f")[0])
    assert True == 1 and not same(True, 1)  # noqa: E712 - the point: == cannot tell them apart
    assert 0.0 == -0.0 and not same(0.0, -0.0)
    assert {"a": 1, "b": 2} == {"b": 2, "a": 1} and not same({"a": 1, "b": 2}, {"b": 2, "a": 1})


@given(value=values)
@settings(max_examples=300, deadline=None)
def test_cborview_reads_what_cbor2_writes(value):
    payload = cbor2.dumps(value)
    got, end = cborview.loads(payload)
    assert end == len(payload)
    assert same(plain(got), value)


@given(value=st.dictionaries(st.text(max_size=8), values, min_size=1, max_size=6), cut=st.integers(0, 400),
       tail=st.binary(max_size=8))
@settings(max_examples=300, deadline=None)
def test_cborview_on_truncated_or_extended_payloads_agrees_with_cbor2_or_defers(value, cut, tail):
    payload = cbor2.dumps(value)
    payload = payload[:max(0, len(payload) - cut)] + tail if cut else payload + tail
    try:
        got, end = cborview.loads(payload)
    except cborview.Unsupported:
        return  # cbor2 decides
    decoder = cbor2.CBORDecoder(io.BytesIO(payload))
    assert same(plain(got), decoder.decode())
    assert end == decoder.fp.tell()


@given(junk=st.binary(min_size=1, max_size=300))
@settings(max_examples=500, deadline=None)
def test_cborview_on_junk_agrees_with_cbor2_or_defers(junk):
    try:
        got, end = cborview.loads(junk)
    except cborview.Unsupported:
        return
    decoder = cbor2.CBORDecoder(io.BytesIO(junk))
    assert same(plain(got), decoder.decode())  # NaNs included: bit for bit
    assert end == decoder.fp.tell()


@pytest.mark.parametrize("payload, defers", [
    (b"\xf9\x7e\x00", True), (b"\xf9\xfe\x01", True), (b"\xf9\x7c\x01", True),  # half NaNs: struct drops payloads
    (b"\xfa\x7f\xc0\x00\x01", False), (b"\xfa\xff\x80\x00\x01", False),  # single: quiet, signalling
    (b"\xfb\x7f\xf8\x00\x00\x00\x00\x00\x01", False), (b"\xfb\xff\xf0\x00\x00\x00\x00\x00\x01", False),
    (b"\x82\xf9\x7c\x00\xf9\x80\x00", False),  # half +inf and -0.0
])
def test_cborview_reads_nans_and_signed_zeros_bit_for_bit_like_cbor2_or_defers(payload, defers):
    # The junk test above meets these only by chance. A half NaN defers: cbor2 keeps its payload bits.
    if defers:
        with pytest.raises(cborview.Unsupported, match="half-precision NaN"):
            cborview.loads(payload)
        return
    got, end = cborview.loads(payload)
    assert same(plain(got), cbor2.loads(payload)) and end == len(payload)


@pytest.mark.parametrize("payload, why", [
    (b"\xc2\x41\x01", "tag"),
    (b"\x5f\x41\x01\xff", "indefinite length"),
    (b"\xa2\x61a\x01\x61a\x02", "map key"),  # duplicate key
    (b"\xa1\x01\x02", "map key"),  # integer key
    (b"\x62\xc3\x28", "utf-8"),
    (b"\x5a\x00\x01\x00\x00" + b"\x00" * 10, "truncated"),
    (b"\x81" * (cborview.MAX_DEPTH + 2) + b"\x00", "nesting"),
    (b"\xf7", "simple value"),  # undefined
])
def test_cborview_defers_what_it_does_not_cover(payload, why):
    with pytest.raises(cborview.Unsupported, match=why):
        cborview.loads(payload)


def _shard(n_values: int = 70_000) -> tuple[UpdateShard, bytes]:
    data = np.arange(n_values, dtype="<f4").tobytes()
    d = digest(data)
    s = UpdateShard(device="dev-1", round_id=3, update_id="u1", index=0, count=1, offset=0, length=n_values,
                    num_params=n_values, codec="raw", data=data, digest=d, update_digest=shards_digest([d]),
                    num_samples=10, base_version=2, metrics={"train_loss": 0.5})
    return s, encode(s)


def test_a_decoded_shard_views_its_payload_and_re_encodes_byte_for_byte():
    shard, payload = _shard()
    got = decode(payload, UpdateShard)
    assert isinstance(got.data, memoryview) and got.data.obj is payload  # no copy of the 280 KB
    assert got == shard
    assert encode(got) == payload
    assert digest(got.data) == shard.digest


def test_a_long_payload_cborview_cannot_read_still_decodes_through_cbor2():
    shard, payload = _shard()
    body = cbor2.loads(payload)
    tagged = cbor2.dumps({**body, "data": cbor2.CBORTag(24, body["data"])})  # a tag: cborview defers
    with pytest.raises(ProtocolError) as err:
        decode(tagged, UpdateShard)
    assert (err.value.field, err.value.reason) == ("data", "type")
    for bad, reason in ((payload + b"\x00", "trailing_bytes"), (payload[:-1], "cbor")):
        with pytest.raises(ProtocolError) as err:
            decode(bad, UpdateShard)
        assert (err.value.field, err.value.reason) == ("payload", reason)


# -- paho_fast vs paho ---------------------------------------------------------------------------

def _publish_packet(topic: bytes, mid: int | None, payload: bytes) -> bytearray:
    body = struct.pack("!H", len(topic)) + topic
    if mid is not None:
        body += struct.pack("!H", mid)
    return bytearray(body + payload)


def _outcome(fn, header, packet, protocol):
    try:
        return fn(header, bytearray(packet), protocol)
    except MalformedPacket:
        return "malformed"


@given(topic=st.binary(max_size=40), qos=st.integers(0, 2), mid=st.integers(0, 65535), dup=st.booleans(),
       retain=st.booleans(), payload=st.binary(max_size=2000), cut=st.integers(0, 50),
       protocol=st.sampled_from([MQTTProtocolVersion.MQTTv31, MQTTProtocolVersion.MQTTv311]))
@settings(max_examples=400, deadline=None)
def test_paho_fast_decodes_publish_exactly_like_paho(topic, qos, mid, dup, retain, payload, cut, protocol):
    header = 0x30 | (dup << 3) | (qos << 1) | retain
    packet = _publish_packet(topic, mid if qos else None, payload)
    packet = packet[:len(packet) - cut] if cut else packet
    assert _outcome(paho_fast.decode_publish, header, packet, protocol) == \
        _outcome(paho_fast.ORIGINAL, header, packet, protocol)


def test_paho_fast_installs_into_paho_and_leaves_mqtt5_to_paho(monkeypatch):
    # pyproject pins paho-mqtt >= 2.2, the first paho with a _packet module (2.1 parses PUBLISH
    # inside client.py): on every paho the project allows, the services get the fast path.
    monkeypatch.setattr(_packet, "decode_publish", paho_fast.ORIGINAL)  # restored after the test
    assert paho_fast.install() is True
    assert _packet.decode_publish is paho_fast.decode_publish
    props = b"\x00"  # empty MQTT 5 property block
    packet = bytearray(struct.pack("!H", 1) + b"t" + struct.pack("!H", 7) + props + b"hello")
    got = paho_fast.decode_publish(0x32, packet, MQTTProtocolVersion.MQTTv5)
    assert (got.topic, got.mid, got.payload) == (b"t", 7, b"hello")


def test_paho_fast_leaves_a_paho_with_unknown_internals_alone(monkeypatch, caplog):
    # A paho without the decoder it was written against (ORIGINAL is None) keeps its own code.
    monkeypatch.setattr(_packet, "decode_publish", paho_fast.ORIGINAL)
    monkeypatch.setattr(paho_fast, "ORIGINAL", None)
    with caplog.at_level("INFO", logger="fedsync.mqtt"):
        assert paho_fast.install() is False
    assert _packet.decode_publish is not paho_fast.decode_publish
    assert [r.getMessage() for r in caplog.records] == ["paho_fast_not_installed reason=unknown paho internals"]


# -- memtune -----------------------------------------------------------------------------------------

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
@pytest.mark.parametrize("env, want", [({}, "True"), ({"FEDSYNC_MALLOC": "default"}, "False")])
def test_keep_freed_memory_takes_effect_on_glibc_unless_turned_off(env, want):
    code = "from fedsync.transport.memtune import keep_freed_memory as k; print(k())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=60, check=True)
    assert out.stdout.strip() == want


# -- codecs: decode_to vs decode ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["raw", "zstd", "fp16", "int8", "topk"])
@given(values=st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=3000))
@settings(max_examples=40, deadline=None)
def test_decode_to_writes_what_decode_returns(name, values):
    c = get_codec(name)
    v = np.asarray(values, dtype=np.float32)
    data = c.encode(v)
    out = np.full(v.size + 2, 7.0, dtype=np.float32)
    c.decode_to(data, out[1:-1])
    assert out[1:-1].tobytes() == c.decode(data, v.size).tobytes()
    assert out[0] == out[-1] == 7.0  # nothing outside the slice is touched


@pytest.mark.parametrize("name", ["raw", "zstd"])
def test_decode_to_rejects_wrong_sizes_and_non_finite_values(name):
    c = get_codec(name)
    data = c.encode(np.array([1.0, np.inf, 2.0], dtype=np.float32))
    with pytest.raises(ProtocolError) as err:
        c.decode_to(data, np.empty(3, np.float32))
    assert err.value.reason == "not_finite"
    with pytest.raises(ProtocolError) as err:
        c.decode_to(data, np.empty(4, np.float32))
    assert err.value.reason == "size"


# -- journal record without copying the payload -----------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 23, 24, 255, 256, 65_535, 65_536, 300_000])
def test_byte_string_head_matches_cbor2(n):
    payload = bytes(n)
    assert _bytes_head(n) + payload == cbor2.dumps(payload)


def test_a_journalled_shard_reads_back_as_written(tmp_path):
    from fedsync.coordinator.core import CoordinatorCore, RoundPolicy
    from fedsync.messages import PeerStatus
    from fedsync.topics import Topics

    topics = Topics("fedsync")
    core = CoordinatorCore(topics, {"w": np.zeros(70_000, np.float32)},
                           RoundPolicy(rounds=1, target=1, quorum=1, min_devices=1, shard_values=70_000),
                           hyper={}, incarnation=1, seed=0)
    core.start(0.0)
    core.on_message(topics.status("dev-1"), encode(PeerStatus("dev-1", "online")), 1.0)
    manifest = core.round.manifest
    shard, payload = _shard()
    j = Journal(tmp_path)
    j.open_round(manifest)
    j.append("fedsync/up/dev-1/3/u1/0", payload)
    j.sync()
    rec = Journal(tmp_path).load()
    assert rec.manifest == manifest
    assert rec.shards == [("fedsync/up/dev-1/3/u1/0", payload)]
    assert j.records_written == 2  # the manifest header, then the shard


# -- FedAvg in cache-sized steps ------------------------------------------------------------------------

@given(n=st.integers(1, 50), weights=st.lists(st.integers(1, 1000), min_size=1, max_size=6), seed=st.integers(0, 99))
@settings(max_examples=60, deadline=None)
def test_chunked_fedavg_equals_the_reference_mean(n, weights, seed):
    rng = np.random.default_rng(seed)
    deltas = [rng.standard_normal(n).astype(np.float32) for _ in weights]
    agg = FedAvg(n)
    agg.CHUNK = 7  # steps of 7 values: every remainder gets exercised
    agg._scratch = np.empty(min(n, 7))
    for d, w in zip(deltas, weights):
        agg.add(d, w)
    got = agg.finish(np.zeros(n, np.float32))
    want = weighted_mean(deltas, weights).astype(np.float32)
    assert np.array_equal(got, want)


# -- the helper thread ------------------------------------------------------------------------------------

def test_split_map_keeps_order_re_raises_and_nests():
    from fedsync.transport.parallel import both, split_map

    assert split_map(lambda x: x + 1, list(range(101))) == list(range(1, 102))

    def boom(x):
        if x == 90:  # in the helper's half
            raise ProtocolError("data", "codec", "bad shard")
        return x

    with pytest.raises(ProtocolError, match="bad shard"):
        split_map(boom, list(range(100)))
    # A job on the helper that itself splits work runs it inline instead of waiting on itself.
    assert both(lambda: 1, lambda: split_map(lambda x: 2 * x, [1, 2, 3, 4, 5])) == (1, [2, 4, 6, 8, 10])
