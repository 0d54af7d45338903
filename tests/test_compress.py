"""The lossy update codecs (int8, top-k) and error feedback, as scenarios and properties.

Every codec must return each value within its stated bound for any finite float32
input; any other payload (random, truncated, mutated, or a well-formed frame with
a lie inside) must end in exactly one ProtocolError on field "data", without
allocating more than the expected output. Error feedback must lose nothing:
what was decoded plus what is still carried equals what was meant to be sent.
"""

from __future__ import annotations

import struct
import tracemalloc
from fractions import Fraction

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedsync.codecs import lossy as compress
from fedsync.codecs import get_codec, register
from fedsync.codecs.lossy import (
    INT8_CHUNK,
    ErrorFeedback,
    int8_error_bound,
    topk_codec,
    topk_count,
    topk_error_bound,
)
from fedsync.errors import ProtocolError

F32_MAX = float(np.finfo(np.float32).max)
FRACTIONS = {"topk": Fraction("0.1"), "topk1": Fraction("0.01")}
LOSSY = ["int8", "topk", "topk1"]
SHARD_VALUES = 65536  # the coordinator's default shard size: the agent encodes slices this long

finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@st.composite
def float32_vectors(draw) -> np.ndarray:
    """Finite float32 vectors: small ones element by element, long ones (past one and
    two int8 chunks, rarely a multiple of 4096) from a seeded generator at a drawn
    magnitude, with zeros, -0.0, subnormals and the float32 extremes planted in."""
    if draw(st.booleans()):
        return draw(hnp.arrays(np.float32, st.integers(1, 40), elements=finite_f32))
    n = draw(st.sampled_from([1, 4095, 4096, 4097, 2 * INT8_CHUNK + 17]) | st.integers(1, 12_000))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    exponent = draw(st.integers(-45, 38))
    shape = draw(st.sampled_from(["normal", "heavy", "sparse", "zeros"]))
    base = {
        "normal": lambda: rng.standard_normal(n),
        "heavy": lambda: rng.standard_t(2, n),
        "sparse": lambda: rng.standard_normal(n) * (rng.random(n) < 0.05),
        "zeros": lambda: np.zeros(n),
    }[shape]()
    v = np.clip(base * 10.0**exponent, -F32_MAX, F32_MAX).astype(np.float32)
    planted = [0.0, -0.0, 1e-45, -1e-45, 1e-40, F32_MAX, -F32_MAX, 1.0]
    for i, x in draw(st.lists(st.tuples(st.integers(0, n - 1), st.sampled_from(planted) | finite_f32), max_size=6)):
        v[i] = x
    return v


def expected_topk(v: np.ndarray, k: int) -> np.ndarray:
    """Reference selection: largest magnitude first, ties to the lowest index."""
    order = np.lexsort((np.arange(v.size), -np.abs(v.astype(np.float64))))
    return np.sort(order[:k])


def frame(body: bytes) -> bytes:
    """A well-formed zstd frame (content size declared) around a hand-made body."""
    return zstandard.ZstdCompressor(level=1).compress(body)


def bomb(claimed: int) -> bytes:
    """A 28-byte zstd frame whose header claims ``claimed`` bytes of content
    (single segment, 8-byte content size, one raw block of 16 zero bytes)."""
    block = (1 | (16 << 3)).to_bytes(3, "little")  # last block, raw, 16 bytes
    return b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + claimed.to_bytes(8, "little") + block + bytes(16)


def assert_protocol_error(codec: str, data: bytes, length: int) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        get_codec(codec).decode(data, length)
    assert caught.value.field == "data"
    return caught.value


# -- round trips within the stated error -------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(float32_vectors())
def test_int8_returns_every_value_within_half_a_chunk_scale(v):
    codec = get_codec("int8")
    decoded = codec.decode(codec.encode(v), v.size)
    assert decoded.dtype == np.float32 and decoded.shape == v.shape
    error = np.abs(decoded.astype(np.float64) - v.astype(np.float64))
    assert (error <= int8_error_bound(v)).all()
    # The bound is the one the module states: scale/2 per chunk, scale = max|x| / 127.
    peaks = [np.abs(v[i:i + INT8_CHUNK].astype(np.float64)).max() for i in range(0, v.size, INT8_CHUNK)]
    stated = np.repeat(np.array(peaks) / 127 / 2 * (1 + 2.0**-15) + 2.0**-148, INT8_CHUNK)[:v.size]
    assert (error <= stated).all()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(float32_vectors(), st.sampled_from(["topk", "topk1"]))
def test_topk_keeps_exactly_the_k_largest_and_zeroes_the_rest(v, name):
    codec = get_codec(name)
    data = codec.encode(v)
    k = topk_count(FRACTIONS[name], v.size)
    kept, _ = compress._topk_parse(data, v.size, FRACTIONS[name])
    assert kept.tolist() == expected_topk(v, k).tolist()

    decoded = codec.decode(data, v.size)
    assert decoded.dtype == np.float32 and decoded.shape == v.shape
    dropped = np.ones(v.size, dtype=bool)
    dropped[kept] = False
    assert (decoded[dropped] == 0).all()
    error = np.abs(decoded[kept].astype(np.float64) - v[kept].astype(np.float64))
    assert (error <= topk_error_bound(v, kept)).all()


@given(float32_vectors())
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_encoding_is_a_pure_function_of_the_values(v):
    for name in LOSSY:
        codec = get_codec(name)
        assert codec.encode(v) == codec.encode(v.copy())


def test_an_empty_slice_round_trips():
    for name in LOSSY:
        codec = get_codec(name)
        assert codec.decode(codec.encode(np.zeros(0, np.float32)), 0).shape == (0,)


def test_the_float32_extremes_survive_both_codecs():
    v = np.array([F32_MAX, -F32_MAX, 1e-45, -0.0, 3.0], dtype=np.float32)
    decoded = get_codec("int8").decode(get_codec("int8").encode(v), 5)
    assert np.isfinite(decoded).all() and decoded[0] == pytest.approx(F32_MAX, rel=2**-11)
    half = topk_codec(0.5)
    data = half.encode(v)
    decoded = half.decode(data, 5)
    assert np.isfinite(decoded).all()
    assert decoded[1] == pytest.approx(-F32_MAX, rel=2**-11)
    # 3.0 is kept but is 2**-126 of the largest kept value, far below fp16's reach
    # once the payload is scaled for F32_MAX: it arrives as 0 (error <= M * 2**-39).
    assert compress._topk_parse(data, 5, Fraction("0.5"))[0].tolist() == [0, 1, 4]
    assert decoded[4] == 0.0


def test_ties_at_the_threshold_go_to_the_lowest_indices():
    v = np.array([1, -2, 2, 1, -2, 2, 0, 0, 0, 0], dtype=np.float32)
    kept, values = compress._topk_parse(topk_codec(0.3).encode(v), 10, Fraction("0.3"))
    assert kept.tolist() == [1, 2, 4]
    assert values.tolist() == [-2, 2, -2]


def test_keep_counts_use_exact_fractions():
    assert topk_count(Fraction("0.07"), 100) == 7  # 0.07 * 100 is 7.000000000000001 in floats
    assert len(np.flatnonzero(topk_codec(0.07).decode(topk_codec(0.07).encode(np.ones(100, np.float32)), 100))) == 7
    assert topk_count(Fraction("0.1"), 31) == 4
    assert topk_count(Fraction("0.01"), 5) == 1  # at least one value
    assert topk_count(Fraction("0.01"), 65536) == 656
    assert topk_count(Fraction("0.1"), 0) == 0


def test_topk_codec_names_its_fraction_and_registers_on_request():
    codec = topk_codec(0.05)
    assert codec.name == "topk0.05" and not codec.lossless
    assert topk_codec(1e-5).name == "topk0.00001"
    v = np.arange(200, dtype=np.float32)
    assert np.flatnonzero(codec.decode(codec.encode(v), 200)).tolist() == list(range(190, 200))
    register(codec)
    assert get_codec("topk0.05") is codec
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            topk_codec(bad)


def test_the_registry_holds_the_lossy_codecs():
    for name in LOSSY:
        assert get_codec(name).name == name and not get_codec(name).lossless


def test_encoders_refuse_non_finite_values():
    for name in LOSSY:
        for bad in (np.nan, np.inf, -np.inf):
            with pytest.raises(ValueError):
                get_codec(name).encode(np.array([1.0, bad], dtype=np.float32))


def test_subnormal_chunk_peaks_keep_the_int8_bound():
    # peak / 127 rounded to the nearest subnormal can land far below peak / 127
    # (190 ulp / 127 = 1.5 ulp -> 1 ulp); the scale is rounded up instead.
    tiny = np.float32(2.0**-149)
    codec = get_codec("int8")
    for ulps in range(1, 600):
        v = np.array([ulps, -ulps // 3, 1, 0], dtype=np.float32) * tiny
        error = np.abs(codec.decode(codec.encode(v), 4).astype(np.float64) - v)
        assert (error <= int8_error_bound(v)).all(), ulps


def test_the_int8_scale_cap_is_the_largest_that_cannot_overflow():
    cap = np.float32(compress._MAX_SCALE)
    assert float(cap) * 127 <= F32_MAX < float(np.nextafter(cap, np.float32(np.inf))) * 127


# -- hostile payloads --------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(LOSSY), st.binary(max_size=300), st.integers(0, 20_000))
def test_random_bytes_only_ever_raise_protocol_error(name, data, length):
    try:
        decoded = get_codec(name).decode(data, length)
    except ProtocolError as exc:
        assert exc.field == "data"
    else:  # vanishingly rare, but then it must be a well-formed result
        assert decoded.shape == (length,) and np.isfinite(decoded).all()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(LOSSY), float32_vectors(), st.data())
def test_truncated_payloads_are_rejected(name, v, data):
    payload = get_codec(name).encode(v)
    cut = data.draw(st.integers(0, len(payload) - 1))
    assert_protocol_error(name, payload[:cut], v.size)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(LOSSY), float32_vectors(), st.data())
def test_mutated_payloads_decode_finite_or_raise_protocol_error(name, v, data):
    payload = bytearray(get_codec(name).encode(v))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(payload) - 1))
        payload[i] ^= data.draw(st.integers(1, 255))
    try:
        decoded = get_codec(name).decode(bytes(payload), v.size)
    except ProtocolError as exc:
        assert exc.field == "data"
    else:
        assert decoded.shape == v.shape and np.isfinite(decoded).all()


def test_wrong_lengths_are_rejected():
    v = np.linspace(-1, 1, 5000, dtype=np.float32)
    for name in LOSSY:
        payload = get_codec(name).encode(v)
        assert assert_protocol_error(name, payload, -1).reason == "size"
        assert assert_protocol_error(name, payload, 0).reason == "size"
    assert assert_protocol_error("int8", get_codec("int8").encode(v), 5001).reason == "size"
    # top-k keeps 500 of 5000 but 501 of 5001: the frame holds the wrong count.
    assert assert_protocol_error("topk", get_codec("topk").encode(v), 5001).reason == "size"
    # Same count (500 of 4991), but index 4999 does not fit.
    assert assert_protocol_error("topk", get_codec("topk").encode(v), 4991).reason == "range"


def bombs(name: str, claimed: int) -> list[bytes]:
    """Payloads of codec ``name`` in which a frame claims ``claimed`` bytes."""
    if name == "int8":
        return [bomb(claimed)]
    # 1000 values: topk keeps 100, topk1 keeps 10.
    k = topk_count(FRACTIONS[name], 1000)
    index_frame, value_frame = frame(bytes(4 * k)), frame(bytes(2 + 2 * k))
    return [topk_payload(bomb(claimed), value_frame), topk_payload(index_frame, bomb(claimed))]


@pytest.mark.parametrize("name", LOSSY)
def test_a_frame_claiming_a_terabyte_is_refused_before_allocating(name):
    tracemalloc.start()
    try:
        for claimed in (2**40, 2**34, 2**20):
            for payload in bombs(name, claimed):
                assert assert_protocol_error(name, payload, 1000).reason == "size"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_a_frame_without_a_declared_size_is_refused():
    body = bytes(4 + 100)  # a valid int8 body for 100 zeros
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(body)
    assert assert_protocol_error("int8", unsized, 100).reason == "size"
    assert get_codec("int8").decode(frame(body), 100).tolist() == [0.0] * 100


def int8_body(scales: list[float], codes: list[int]) -> bytes:
    return np.array(scales, dtype="<f4").tobytes() + np.array(codes, dtype=np.int8).tobytes()


@pytest.mark.parametrize("scale, reason", [
    (float("nan"), "range"), (float("inf"), "range"), (-1.0, "range"),
    (float(np.nextafter(np.float32(compress._MAX_SCALE), np.float32(np.inf))), "range"),
])
def test_absurd_int8_scales_are_rejected(scale, reason):
    assert assert_protocol_error("int8", frame(int8_body([scale], [1, 2, 3])), 3).reason == reason


def test_int8_code_minus_128_is_rejected():
    assert get_codec("int8").decode(frame(int8_body([0.5], [-127, 0, 127])), 3).tolist() == [-63.5, 0, 63.5]
    assert assert_protocol_error("int8", frame(int8_body([0.5], [-128, 0, 1])), 3).reason == "range"


def test_int8_body_of_the_wrong_size_is_rejected():
    assert assert_protocol_error("int8", frame(int8_body([0.5], [1, 2])), 3).reason == "size"
    assert assert_protocol_error("int8", frame(int8_body([0.5], [1, 2, 3, 4])), 3).reason == "size"


def shuffled(a: np.ndarray) -> bytes:
    return np.frombuffer(a.tobytes(), np.uint8).reshape(-1, a.itemsize).T.tobytes()


def topk_payload(index_frame: bytes, value_frame: bytes) -> bytes:
    return struct.pack("<I", len(index_frame)) + index_frame + value_frame


def topk_frames(shift: int, deltas: list[int], halves: list[float]) -> bytes:
    """A top-k payload built by hand: indices as deltas, fp16 values scaled by 2**shift."""
    return topk_payload(frame(shuffled(np.array(deltas, "<u4"))),
                        frame(struct.pack("<h", shift) + shuffled(np.array(halves, "<f2"))))


def test_a_hand_made_topk_payload_decodes():
    # topk0.3 of 10 keeps 3; indices 2, 3, 7; values scaled by 2**1.
    decoded = topk_codec(0.3).decode(topk_frames(1, [2, 1, 4], [2.0, -4.0, 1.0]), 10)
    assert decoded.tolist() == [0, 0, 1.0, -2.0, 0, 0, 0, 0.5, 0, 0]


_GOOD = topk_frames(0, [1, 1, 1], [1, 1, 1])


@pytest.mark.parametrize("payload, reason", [
    (topk_frames(0, [2, 1, 7], [1, 1, 1]), "range"),            # index 10 of 10
    (topk_frames(0, [2, 0, 4], [1, 1, 1]), "order"),            # index 2 twice
    (topk_frames(0, [2, 2**32 - 1, 4], [1, 1, 1]), "range"),    # a delta that would wrap in uint32
    (topk_frames(0, [1, 1, 1], [1, float("nan"), 1]), "not_finite"),
    (topk_frames(0, [1, 1, 1], [1, float("inf"), 1]), "not_finite"),
    (topk_frames(compress._SHIFT_MIN - 1, [1, 1, 1], [1, 1, 1]), "range"),
    (topk_frames(compress._SHIFT_MAX + 1, [1, 1, 1], [1, 1, 1]), "range"),
    (topk_frames(compress._SHIFT_MIN, [1, 1, 1], [1, 65504, 1]), "not_finite"),  # 65504 * 2**113
    (topk_frames(0, [1, 1], [1, 1, 1]), "size"),                # two indices for three values
    (topk_frames(0, [1, 1, 1], [1, 1]), "size"),
    (b"\x01\x00", "size"),                                      # shorter than the prefix
    (struct.pack("<I", len(_GOOD)) + _GOOD[4:], "size"),        # index frame runs past the end
    (struct.pack("<I", 3) + _GOOD[4:], "codec"),                # index frame cut short
    (_GOOD[:-3], "codec"),                                      # value frame cut short
])
def test_lies_inside_a_well_formed_topk_payload_are_rejected(payload, reason):
    assert topk_codec(0.3).decode(_GOOD, 10).tolist() == [0, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    with pytest.raises(ProtocolError) as caught:
        topk_codec(0.3).decode(payload, 10)
    assert (caught.value.field, caught.value.reason) == ("data", reason)


# -- error feedback -----------------------------------------------------------------


def sharded_round_trip(codec_name: str, vector: np.ndarray) -> np.ndarray:
    """What the coordinator reassembles: each shard encoded and decoded on its own."""
    codec = get_codec(codec_name)
    out = np.empty_like(vector)
    for off in range(0, vector.size, SHARD_VALUES):
        part = vector[off:off + SHARD_VALUES]
        out[off:off + part.size] = codec.decode(codec.encode(part), part.size)
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(LOSSY), st.integers(1, 3000), st.integers(0, 2**32 - 1), st.integers(1, 40))
def test_error_feedback_loses_nothing_over_rounds_of_a_constant_delta(name, n, seed, rounds):
    delta = (np.random.default_rng(seed).standard_t(3, n) * 1e-3).astype(np.float32)
    ef = ErrorFeedback(n)
    sent = np.zeros(n, dtype=np.float64)
    largest = 0.0
    for _ in range(rounds):
        compensated = ef.compensate(delta)
        decoded = sharded_round_trip(name, compensated)
        ef.update(compensated, decoded)
        sent += decoded
        largest = max(largest, float(np.abs(compensated).max()))
    # sum(decoded) + residual == T * delta, up to one float32 rounding per add and subtract.
    drift = np.abs(sent + ef.residual - rounds * delta.astype(np.float64))
    assert (drift <= 2 * rounds * largest * 2.0**-24 + 2.0**-140).all()


@settings(max_examples=25, deadline=None)
@given(st.integers(10, 3000), st.integers(0, 2**32 - 1), st.sampled_from([0.5, 0.1, 0.01]))
def test_topk_residual_stays_bounded_with_error_feedback(n, seed, fraction):
    # Top-k is a contraction: it drops at most (n - k)/n of the energy, plus fp16 rounding
    # of what it keeps, so ||r_t|| <= q ||c_t|| and the residual stays below q / (1 - q) ||delta||.
    rng = np.random.default_rng(seed)
    codec = topk_codec(fraction)
    k = topk_count(Fraction(str(fraction)), n)
    q = np.sqrt(1 - k / n + 2.0**-20)
    ef = ErrorFeedback(n)
    worst = 0.0
    for _ in range(30):
        delta = (rng.standard_normal(n) * 1e-2).astype(np.float32)
        compensated = ef.compensate(delta)
        ef.update(compensated, codec.decode(codec.encode(compensated), n))
        assert np.linalg.norm(ef.residual) <= q * np.linalg.norm(compensated) * (1 + 1e-6)
        worst = max(worst, float(np.linalg.norm(delta)))
    assert np.linalg.norm(ef.residual) <= q / (1 - q) * worst * (1 + 1e-5)


def test_error_feedback_checks_shapes_and_hides_its_memory():
    ef = ErrorFeedback(4)
    with pytest.raises(ValueError):
        ef.compensate(np.zeros(5, np.float32))
    with pytest.raises(ValueError):
        ef.update(np.zeros(4, np.float32), np.zeros(3, np.float32))
    ef.update(np.ones(4, np.float32), np.zeros(4, np.float32))
    with pytest.raises(ValueError):
        ef.residual[0] = 5.0
    assert ef.compensate(np.ones(4, np.float32)).tolist() == [2.0] * 4


# -- measured sizes --------------------------------------------------------------------


def softmax_regression_delta(rng: np.random.Generator, dim: int = 4096, classes: int = 256) -> np.ndarray:
    """The update of 3 gradient-descent steps of softmax regression (1,048,576 weights)
    on 512 examples whose non-negative features occur with Zipf-like frequencies,
    as in bag-of-words or pixel data."""
    n = 512
    frequency = np.minimum(1.0, 400 / np.arange(1, dim + 1) ** 0.8 / 19.0)
    x = ((rng.random((n, dim)) < frequency) * rng.exponential(1.0, (n, dim))).astype(np.float32)
    y = np.argmax(x @ rng.standard_normal((dim, classes)).astype(np.float32) + rng.gumbel(size=(n, classes)), axis=1)
    w = (0.01 * rng.standard_normal((dim, classes))).astype(np.float32)
    start = w.copy()
    for _ in range(3):
        z = x @ w
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(n), y] -= 1
        w -= np.float32(0.5 / n) * (x.T @ p)
    return (w - start).ravel()


@pytest.mark.parametrize("kind", ["softmax_regression", "student_t3"])
def test_compression_ratios_on_a_million_value_delta(kind):
    rng = np.random.default_rng(7)
    if kind == "softmax_regression":
        delta = softmax_regression_delta(rng)
    else:
        delta = (rng.standard_t(3, 1 << 20) * 1e-3).astype(np.float32)
    assert delta.size == 1 << 20 and delta.dtype == np.float32

    def ratio(name: str) -> float:
        codec = get_codec(name)
        sent = sum(len(codec.encode(delta[off:off + SHARD_VALUES])) for off in range(0, delta.size, SHARD_VALUES))
        return delta.nbytes / sent

    # Measured: softmax_regression int8 11.4x, topk 17.1x, topk1 138x;
    # student_t3 int8 6.3x, topk 17.4x, topk1 133x.
    assert ratio("int8") >= 3.5
    assert ratio("topk") >= 6.0
    assert ratio("topk1") >= 60.0
