"""Hostile payloads against the coordinator's decode-and-accept path (sans-IO, seeded).

Scenario: a round is open for dev-0, dev-1 and dev-2. Ten-thousand-odd payloads made
by mutating genuine ``UpdateShard`` messages (bit flips, truncation, splices, fields
replaced with wrong types, huge or non-finite values, wrong schema versions and
kinds, CBOR oddities, oversized payloads, forged-but-consistent updates with garbage
data, wrong topics) go straight into ``CoordinatorCore.on_message``. Then:

* no exception escapes;
* every message is counted exactly once: as a rejected shard, a duplicate, or an
  accepted shard (one that happens to be valid), never zero or two;
* every message the core publishes in answer is a well-formed receipt;
* no hostile update was counted, the round is still open, and a genuine update
  sent afterwards is accepted (``updates_accepted == 1``).

The generator is seeded, so a failure names a reproducible case index.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass

import cbor2
import numpy as np

from fedsync.coordinator.core import CoordinatorCore, RoundPolicy
from fedsync.actions import Publish
from fedsync.codecs import get_codec
from fedsync.messages import MAX_PAYLOAD, RoundManifest, ShardAck, UpdateShard, decode, encode
from fedsync.params import digest, shard_slices, update_digest
from fedsync.topics import Topics

TOPICS = Topics("fuzz")
SEED = 20240611
CASES = 12_000
NOW = 1000.0

# Values that break type, range or finiteness checks, and the CBOR encoder's corner cases.
HOSTILE_VALUES = [
    None, True, False, 0, -1, 1, 2**31, 2**53 + 1, 2**63, 2**64, -(2**64), 10**40, -(10**40),
    0.5, -0.0, 1e308, float("nan"), float("inf"), float("-inf"), "", "x" * 65, "dev/0", "dev+0", "#",
    "\x00", "é" * 40, b"", b"\x00" * 15, b"\xff" * 17, b"x" * 70_000, [], [1, 2], {}, {"a": 1},
    {"train_loss": float("nan")}, {1: 2.0}, cbor2.CBORTag(1, 0), cbor2.CBORTag(2, b"\x01" * 40),
    cbor2.CBORTag(9999, "x"), cbor2.undefined, [[[[[]]]]],
]
FIELDS = ["device", "round_id", "update_id", "base_version", "index", "count", "offset", "length",
          "num_params", "codec", "num_samples", "digest", "update_digest", "data", "metrics"]


@dataclass
class Case:
    topic: str
    payload: bytes
    kind: str


def open_round() -> tuple[CoordinatorCore, RoundManifest]:
    params = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}  # 16 values
    policy = RoundPolicy(rounds=1, target=3, quorum=3, min_devices=3, shard_values=5, round_timeout=600.0)
    core = CoordinatorCore(TOPICS, params, policy, hyper={"lr": 0.1}, incarnation=1, seed=0)
    out = core.start(NOW)
    from fedsync.messages import PeerStatus

    for d in ("dev-0", "dev-1", "dev-2"):
        out += core.on_message(TOPICS.status(d), encode(PeerStatus(d, "online")), NOW)
    manifests = [decode(a.payload, RoundManifest) for a in out
                 if isinstance(a, Publish) and a.topic == TOPICS.manifest]
    manifest = manifests[-1]
    assert manifest.state == "open" and manifest.selected == ("dev-0", "dev-1", "dev-2")
    return core, manifest


def genuine_update(m: RoundManifest, device: str, update_id: str, values: np.ndarray,
                   num_samples: int = 10) -> list[tuple[str, bytes]]:
    """What an honest agent publishes for ``values`` (the delta) in round ``m``."""
    codec = get_codec(m.update_codec)
    slices = shard_slices(m.num_params, m.shard_values)
    datas = [codec.encode(values[off:off + n]) for off, n in slices]
    whole = update_digest((digest(d) for d in datas), federation=m.federation, device=device, round_id=m.round_id,
                          update_id=update_id, base_version=m.model_version, base_digest=m.model_digest)
    return [(TOPICS.up(device, m.round_id, update_id, i),
             encode(UpdateShard(device=device, round_id=m.round_id, update_id=update_id,
                                base_version=m.model_version, index=i, count=len(slices), offset=off, length=n,
                                num_params=m.num_params, codec=codec.name, num_samples=num_samples,
                                digest=digest(data), update_digest=whole, data=data,
                                metrics={"train_loss": 0.5})))
            for i, ((off, n), data) in enumerate(zip(slices, datas))]


class Mutator:
    """Seeded hostile-payload generator over a corpus of genuine shards."""

    def __init__(self, rng: random.Random, manifest: RoundManifest, corpus: list[tuple[str, bytes]]) -> None:
        self.rng, self.m, self.corpus = rng, manifest, corpus
        self.ops = [
            (self.bit_flips, 14), (self.truncate, 8), (self.splice, 6), (self.trailing, 3), (self.random_bytes, 5),
            (self.replace_field, 22), (self.drop_or_add_field, 6), (self.schema_version, 4), (self.kind, 3),
            (self.non_finite_data, 6), (self.redigested_garbage, 8), (self.garbage_update, 4),
            (self.wrong_topic, 8), (self.cbor_oddity, 3),
        ]
        self._weights = [w for _, w in self.ops]

    def case(self) -> Case:
        op = self.rng.choices(self.ops, self._weights)[0][0]
        return op()

    def _pick(self) -> tuple[str, bytes, dict]:
        topic, payload = self.rng.choice(self.corpus)
        return topic, payload, cbor2.loads(payload)

    # -- byte level --------------------------------------------------------------------
    def bit_flips(self) -> Case:
        topic, payload, _ = self._pick()
        b = bytearray(payload)
        for _ in range(self.rng.randint(1, 8)):
            b[self.rng.randrange(len(b))] ^= 1 << self.rng.randrange(8)
        return Case(topic, bytes(b), "bit_flips")

    def truncate(self) -> Case:
        topic, payload, _ = self._pick()
        return Case(topic, payload[:self.rng.randrange(len(payload))], "truncate")

    def splice(self) -> Case:
        topic, a, _ = self._pick()
        _, b, _ = self._pick()
        i, j = self.rng.randrange(len(a)), self.rng.randrange(len(b))
        return Case(topic, a[:i] + b[j:], "splice")

    def trailing(self) -> Case:
        topic, payload, _ = self._pick()
        return Case(topic, payload + self.rng.randbytes(self.rng.randint(1, 16)), "trailing")

    def random_bytes(self) -> Case:
        topic, _, _ = self._pick()
        if self.rng.random() < 0.002:  # a few oversized ones (refused before parsing)
            return Case(topic, b"\xa0" * (MAX_PAYLOAD + 1), "oversized")
        return Case(topic, self.rng.randbytes(self.rng.randint(0, 600)), "random_bytes")

    # -- structure level ---------------------------------------------------------------
    def _dump(self, topic: str, body: dict, kind: str) -> Case:
        try:
            return Case(topic, cbor2.dumps(body), kind)
        except Exception:  # a value cbor2 cannot write: send the raw repr instead
            return Case(topic, repr(body).encode()[:2000], kind)

    def replace_field(self) -> Case:
        topic, _, body = self._pick()
        for _ in range(self.rng.choice([1, 1, 1, 2, 3])):
            body[self.rng.choice(FIELDS)] = self.rng.choice(HOSTILE_VALUES)
        return self._dump(topic, body, "replace_field")

    def drop_or_add_field(self) -> Case:
        topic, _, body = self._pick()
        if self.rng.random() < 0.5:
            body.pop(self.rng.choice(FIELDS + ["v", "t"]), None)
        else:
            body[self.rng.choice(["extra", "signature", 7, b"k", ""])] = self.rng.choice(HOSTILE_VALUES)
        return self._dump(topic, body, "drop_or_add_field")

    def schema_version(self) -> Case:
        topic, _, body = self._pick()
        body["v"] = self.rng.choice([0, 2, -1, "1", 1.0, None, 2**70])
        return self._dump(topic, body, "schema_version")

    def kind(self) -> Case:
        topic, _, body = self._pick()
        body["t"] = self.rng.choice(["manifest", "model", "ack", "status", "UPDATE", "", 3, None])
        return self._dump(topic, body, "kind")

    def non_finite_data(self) -> Case:
        """Digest-valid shard whose data decodes to NaN/Inf: must die in the codec."""
        topic, _, body = self._pick()
        values = np.zeros(body["length"], np.float32)
        values[self.rng.randrange(values.size)] = self.rng.choice([np.nan, np.inf, -np.inf])
        body["data"] = _unchecked_zstd(values) if self.rng.random() < 0.7 else values.astype("<f4").tobytes()
        body["digest"] = digest(body["data"])
        return self._dump(topic, body, "non_finite_data")

    def redigested_garbage(self) -> Case:
        """Garbage data with a matching shard digest: reaches the assembler."""
        topic, _, body = self._pick()
        body["data"] = self.rng.randbytes(self.rng.randint(0, 64))
        body["digest"] = digest(body["data"])
        if self.rng.random() < 0.4:  # any index, at its layout's place: lets garbage updates complete
            slices = shard_slices(self.m.num_params, self.m.shard_values)
            body["index"] = self.rng.randrange(len(slices))
            body["offset"], body["length"] = slices[body["index"]]
            topic = TOPICS.up(body["device"], body["round_id"], body["update_id"], body["index"])
        if self.rng.random() < 0.3:
            body["num_samples"] = self.rng.choice([1, 2**40, 999])  # inconsistent with open update
        if self.rng.random() < 0.3:
            body["update_id"] = f"g{self.rng.randrange(50)}"
            topic = TOPICS.up(body["device"], body["round_id"], body["update_id"], body["index"])
        return self._dump(topic, body, "redigested_garbage")

    def garbage_update(self) -> Case:
        """One shard of a complete, self-consistent update for dev-2 whose data is garbage:
        per-shard and whole-update digests match, so it fails only when decoded."""
        slices = shard_slices(self.m.num_params, self.m.shard_values)
        uid = f"bad{self.rng.randrange(40)}"
        rng = random.Random(uid)  # the same update id always gets the same shards
        if rng.random() < 0.5:  # undecodable bytes
            datas = [rng.randbytes(rng.randint(0, 40)) for _ in slices]
        else:  # well-formed zstd frames of the right length, one holding a NaN or an infinity
            bad = rng.randrange(len(slices))
            datas = [_unchecked_zstd(np.full(n, np.nan if i == bad and rng.random() < 0.5
                                             else np.inf if i == bad else 0.0, np.float32))
                     for i, (_, n) in enumerate(slices)]
        whole = update_digest((digest(d) for d in datas), federation=self.m.federation, device="dev-2",
                              round_id=self.m.round_id, update_id=uid, base_version=self.m.model_version,
                              base_digest=self.m.model_digest)
        i = self.rng.randrange(len(slices))
        off, n = slices[i]
        body = {"v": 1, "t": "update", "device": "dev-2", "round_id": self.m.round_id, "update_id": uid,
                "base_version": self.m.model_version, "index": i, "count": len(slices), "offset": off,
                "length": n, "num_params": self.m.num_params, "codec": self.m.update_codec, "num_samples": 5,
                "digest": digest(datas[i]), "update_digest": whole, "data": datas[i], "metrics": {}}
        return Case(TOPICS.up("dev-2", self.m.round_id, uid, i), cbor2.dumps(body), "garbage_update")

    def wrong_topic(self) -> Case:
        topic, payload, body = self._pick()
        parts = topic.split("/")
        choice = self.rng.randrange(6)
        if choice == 0:
            parts[3] = self.rng.choice(["dev-0", "dev-1", "dev-2", "dev-9", "", "+", "coordinator"])
        elif choice == 1:
            parts[4] = self.rng.choice(["0", "-1", "9" * 30, "x", "", str(self.m.round_id + 1)])
        elif choice == 2:
            parts[6] = self.rng.choice(["0", "4", "65536", "-0", "1e3", ""])
        elif choice == 3:
            parts.append(self.rng.choice(["", "x", "0"]))
        elif choice == 4:  # fewer levels (the bare `up` level is rejected as a format error)
            parts = parts[:self.rng.randrange(4, len(parts))]
        else:
            parts[5] = self.rng.choice(["", "u" * 65, "u/x", "other"])
        return Case("/".join(parts), payload, "wrong_topic")

    def cbor_oddity(self) -> Case:
        topic, _, body = self._pick()
        choice = self.rng.randrange(6)
        depth = self.rng.choice([100, 20_000])
        if choice == 0:  # arrays nested far deeper than any message, at the top level
            return Case(topic, b"\x81" * depth + b"\x80", "cbor_oddity")
        if choice == 1:  # ... and as the value of a field
            return Case(topic, b"\xa1\x67metrics" + b"\x81" * depth + b"\x80", "cbor_oddity")
        if choice == 2:  # data as an indefinite-length byte string (same bytes, other encoding)
            raw = cbor2.dumps(body)
            chunk = cbor2.dumps(body["data"])
            return Case(topic, raw.replace(chunk, b"\x5f" + chunk + b"\xff", 1), "cbor_oddity")
        if choice == 3:  # a top-level array, a bare integer, a self-described (tagged) map
            return Case(topic, cbor2.dumps(self.rng.choice([[body], 7, cbor2.CBORTag(55799, body)])), "cbor_oddity")
        if choice == 4:  # a map declaring 2**63 entries, and nothing after it
            return Case(topic, b"\xbb" + (2**63).to_bytes(8, "big"), "cbor_oddity")
        return Case(topic, b"\x5b" + (2**62).to_bytes(8, "big") + b"abc", "cbor_oddity")  # 4 EiB byte string


def _unchecked_zstd(values: np.ndarray) -> bytes:
    # The zstd codec's layout (4 byte planes, zstd level 1) without its finiteness check,
    # so NaN gets as far as the decoder.
    import zstandard

    raw = values.astype("<f4").tobytes()
    shuffled = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 4).T.tobytes()
    return zstandard.ZstdCompressor(level=1).compress(shuffled)


def counts(core: CoordinatorCore) -> tuple[int, int, int, int]:
    s = core.stats
    return s.shards_rejected, s.duplicates_dropped, s.shards_accepted, s.updates_accepted


def test_twelve_thousand_hostile_payloads_are_each_counted_once_and_a_genuine_update_still_counts():
    started = time.monotonic()
    core, m = open_round()
    rng = random.Random(SEED)
    # The corpus lacks the last shard of each genuine update, so no mutation can complete
    # a valid one: that would take data with a given SHA-256 digest. Mutants that happen to
    # stay valid (a metrics map replaced by {}) are counted as accepted shards.
    corpus = (genuine_update(m, "dev-1", "u-dev1", np.linspace(-1, 1, m.num_params, dtype=np.float32))[:-1]
              + genuine_update(m, "dev-2", "u-dev2", np.full(m.num_params, 0.25, np.float32))[:-1])
    fuzz = Mutator(rng, m, corpus)

    outcomes: Counter = Counter()
    kinds: Counter = Counter()
    escaped: list[tuple[int, str, BaseException]] = []
    bad_replies: list[tuple[int, str]] = []
    for i in range(CASES):
        case = fuzz.case()
        kinds[case.kind] += 1
        before = counts(core)
        try:
            actions = core.on_message(case.topic, case.payload, NOW)
        except BaseException as exc:  # noqa: BLE001 - the point of the test
            escaped.append((i, case.kind, exc))
            continue
        after = counts(core)
        rejected, duplicate, accepted = (after[k] - before[k] for k in range(3))
        if (rejected, duplicate, accepted) not in ((1, 0, 0), (0, 1, 0), (0, 0, 1)):
            bad_replies.append((i, f"{case.kind}: counted {rejected} rejected, {duplicate} dup, {accepted} accepted"))
        outcomes["rejected" if rejected else "duplicate" if duplicate else "accepted"] += 1
        for a in actions:
            if isinstance(a, Publish):
                try:
                    ack = decode(a.payload, ShardAck)
                except Exception as exc:  # noqa: BLE001
                    bad_replies.append((i, f"{case.kind}: unreadable reply on {a.topic}: {exc}"))
                else:
                    if a.topic != TOPICS.ack(ack.device):
                        bad_replies.append((i, f"{case.kind}: receipt for {ack.device} on {a.topic}"))

    assert escaped == [], f"{len(escaped)} exceptions escaped, first: {escaped[:3]}"
    assert bad_replies == [], bad_replies[:5]
    assert sum(outcomes.values()) == CASES
    rejected, duplicates, shards_accepted, updates = counts(core)
    assert rejected + duplicates + shards_accepted == CASES  # every payload counted exactly once
    assert updates == 0  # no hostile update was counted
    assert core.round is not None and core.round.manifest.round_id == m.round_id  # the round survived
    assert sum(core.stats.rejected_by_reason.values()) == rejected
    # The generator reached deep: decode, topic, digest, layout, assembler and codec checks all fired.
    reasons = core.stats.rejected_by_reason
    for reason in ("cbor", "trailing_bytes", "schema_version", "type", "unknown_field", "missing",
                   "topic_mismatch", "digest", "update_digest", "inconsistent_update"):
        assert reasons[reason] > 0, (reason, dict(reasons))
    assert reasons["decode_codec"] > 0 and reasons["decode_not_finite"] > 0, dict(reasons)
    assert all(kinds[op.__name__] >= 50 for op, _ in fuzz.ops), kinds

    # A genuine update after all that: accepted, exactly once.
    for topic, payload in genuine_update(m, "dev-0", "u-genuine", np.full(m.num_params, 0.5, np.float32)):
        core.on_message(topic, payload, NOW)
    assert core.stats.updates_accepted == 1
    assert core.round.assembler.accepted_update("dev-0") == "u-genuine"
    assert time.monotonic() - started < 60


def test_every_field_replaced_by_every_hostile_value_is_counted():
    """Exhaustive over the small grid (15 fields x 41 values), on top of the random cases."""
    core, m = open_round()
    (topic, payload), *_ = genuine_update(m, "dev-1", "u1", np.zeros(m.num_params, np.float32))
    base = cbor2.loads(payload)
    sent = 0
    for name in FIELDS:
        for value in HOSTILE_VALUES:
            body = dict(base, **{name: value})
            try:
                raw = cbor2.dumps(body)
            except Exception:  # noqa: BLE001 - cbor2 cannot write it; nothing to send
                continue
            core.on_message(topic, raw, NOW)
            sent += 1
    rejected, duplicates, shards_accepted, updates = counts(core)
    assert rejected + duplicates + shards_accepted == sent
    assert updates == 0
    # Only a replacement of the right type and range stays valid (metrics {}, the first
    # accepted; later ones are duplicates of shard 0).
    assert shards_accepted == 1 and duplicates == sent - rejected - 1, dict(core.stats.rejected_by_reason)


def test_a_payload_on_the_bare_up_level_is_counted():
    core, m = open_round()
    (_, payload), *_ = genuine_update(m, "dev-1", "u1", np.zeros(m.num_params, np.float32))
    core.on_message(TOPICS.root + "/up", payload, NOW)
    assert core.stats.shards_rejected == 1
