"""Payloads for tests/test_cddl.py: realistic messages of every kind, and the tables of
what the CDDL and the decoder accept, reject, or (for now) disagree on."""

from __future__ import annotations

import math

import cbor2
import numpy as np

from fedsync.messages import ModelShard, PeerStatus, RoundManifest, ShardAck, UpdateShard, encode
from fedsync.params import digest

# -- realistic messages of every kind -----------------------------------------------------

INCARNATION = 1_718_000_000_123_456_789  # time.time_ns() of a coordinator start: above 2**53
DATA = np.linspace(-0.5, 0.5, 8, dtype=np.float32).tobytes()


def manifest(**over) -> RoundManifest:
    base = dict(federation="farm", round_id=12, incarnation=INCARNATION, state="open", mode="sync",
                model_version=11, model_digest=bytes(range(16)), model_codec="zstd", model_shards=2,
                param_spec=(("b", (4,)), ("w", (3, 4))), num_params=16, shard_values=8, update_codec="zstd",
                update_qos=1, deadline=1_718_000_060.25, issued_at=1_718_000_000.25, quorum=2, target=3,
                selected=("pi-kitchen", "pi-garage", "phone-anna"),
                hyper={"lr": 0.1, "epochs": 1.0, "batch_size": 32.0, "mu": 0.01}, delta_from=10)
    base.update(over)
    return RoundManifest(**base)


def update_shard(data: bytes = DATA, **over) -> UpdateShard:
    base = dict(device="pi-kitchen", round_id=12, update_id="u00c0ffee0123", base_version=11, index=1, count=2,
                offset=8, length=8, num_params=16, codec="raw", num_samples=120, digest=digest(data),
                update_digest=bytes(range(16, 32)), data=data, metrics={"train_loss": 0.6931},
                signature=bytes(range(64)))
    base.update(over)
    if "length" not in over:
        base["length"] = len(data) // 4
        base["num_params"] = base["offset"] + base["length"]
    return UpdateShard(**base)


def model_shard(**over) -> ModelShard:
    base = dict(version=11, index=0, count=2, offset=0, length=8, num_params=16, codec="raw", digest=digest(DATA),
                data=DATA, base=10)
    base.update(over)
    return ModelShard(**base)


def shard_ack(**over) -> ShardAck:
    base = dict(device="pi-kitchen", round_id=12, update_id="u00c0ffee0123", count=10, held=b"\xfd\x02",
                status="partial", reason="")
    base.update(over)
    return ShardAck(**base)


def peer_status(**over) -> PeerStatus:
    base = dict(peer="coordinator", state="online", incarnation=INCARNATION)
    base.update(over)
    return PeerStatus(**base)


BUILDERS = {"manifest": manifest, "update": update_shard, "model": model_shard, "ack": shard_ack,
            "status": peer_status}
LARGE_DATA = np.linspace(-1, 1, 2000, dtype=np.float32).tobytes()  # > cborview.VIEW_MIN: the in-place reader


DROP = object()  # in ``changes``: remove the key


def mutated(kind: str, large: bool = False, **changes) -> bytes:
    """A valid message of ``kind`` with keys replaced (``DROP`` removes one), re-encoded by cbor2."""
    msg = update_shard(LARGE_DATA) if large else BUILDERS[kind]()
    body = cbor2.loads(encode(msg))
    for key, value in changes.items():
        if value is DROP:
            body.pop(key)
        else:
            body[key] = value
    return cbor2.dumps(body)




# What another implementation may write and both sides accept: optional keys left out,
# limits reached, integers for float fields, shorter float encodings.
ACCEPTED_BY_BOTH = {
    "manifest without hyper and delta_from": mutated("manifest", hyper=DROP, delta_from=DROP),
    "update without metrics and signature": mutated("update", metrics=DROP, signature=DROP),
    "model shard without base": mutated("model", base=DROP),
    "ack without reason": mutated("ack", reason=DROP),
    "status without incarnation": mutated("status", incarnation=DROP),
    "64-character id": mutated("ack", device="d" * 64),
    "round id 2**53": mutated("ack", round_id=2**53),
    "incarnation 2**63-1": mutated("status", incarnation=2**63 - 1),
    "integer times and hyper-parameters": mutated("manifest", deadline=1_718_000_060, issued_at=1_718_000_000,
                                                  hyper={"epochs": 1, "lr": -0.5}),
    "deadline 10**12": mutated("manifest", deadline=1e12),
    "32 metrics": mutated("update", metrics={f"m{i}": float(i) for i in range(32)}),
    "32-byte metric name": mutated("update", metrics={"x" * 32: 1.0}),
    "largest finite metric": mutated("update", metrics={"x": -1.7976931348623157e308}),
    "num_samples 2**40": mutated("update", num_samples=2**40),
    "empty signature": mutated("update", signature=b""),
    "codec name of 32 bytes": mutated("update", codec="c" * 32),
    "delta_from -1": mutated("manifest", delta_from=-1),
    "reason of 200 bytes": mutated("ack", status="rejected", reason="r" * 200),
}


REJECTED = [
    # (case, kind, changes, (field, reason) the decoder names)
    ("text for an integer", "update", {"round_id": "12"}, ("round_id", "type")),
    ("float for an integer", "update", {"num_samples": 120.0}, ("num_samples", "type")),
    ("true for an integer", "update", {"num_samples": True}, ("num_samples", "type")),
    ("float incarnation (a JS number >= 2**32)", "status", {"incarnation": float(2**40)}, ("incarnation", "type")),
    ("float incarnation in a manifest", "manifest", {"incarnation": float(INCARNATION)}, ("incarnation", "type")),
    ("integer for text", "update", {"update_id": 7}, ("update_id", "type")),
    ("bytes for text", "update", {"device": b"pi-kitchen"}, ("device", "type")),
    ("bytes for a codec name", "update", {"codec": b"raw"}, ("codec", "type")),
    ("bytes for an enumeration", "manifest", {"mode": b"sync"}, ("mode", "type")),
    ("text for bytes", "update", {"digest": "0123456789abcdef"}, ("digest", "type")),
    ("text for data", "model", {"data": "x" * 32}, ("data", "type")),
    ("tag 64 (Uint8Array) bytes", "update", {"data": cbor2.CBORTag(64, DATA)}, ("data", "type")),
    ("tag 64 digest", "model", {"digest": cbor2.CBORTag(64, bytes(16))}, ("digest", "type")),
    ("tag 64 held bitmap", "ack", {"held": cbor2.CBORTag(64, b"\xfd\x02")}, ("held", "type")),
    ("tagged time (tag 1)", "manifest", {"deadline": cbor2.CBORTag(1, 1_718_000_060)}, ("deadline", "type")),
    ("null for optional signature", "update", {"signature": None}, ("signature", "type")),
    ("undefined for optional signature", "update", {"signature": cbor2.undefined}, ("signature", "type")),
    ("null for optional metrics", "update", {"metrics": None}, ("metrics", "type")),
    ("null for optional hyper", "manifest", {"hyper": None}, ("hyper", "type")),
    ("null for optional delta_from", "manifest", {"delta_from": None}, ("delta_from", "type")),
    ("null for optional base", "model", {"base": None}, ("base", "type")),
    ("null for optional reason", "ack", {"reason": None}, ("reason", "type")),
    ("null for optional incarnation", "status", {"incarnation": None}, ("incarnation", "type")),
    ("null for a required field", "ack", {"count": None}, ("count", "type")),
    ("negative round id", "update", {"round_id": -1}, ("round_id", "range")),
    ("round id above 2**53", "ack", {"round_id": 2**53 + 1}, ("round_id", "range")),
    ("bignum (tag 2) round id", "ack", {"round_id": 2**70}, ("round_id", "type")),
    ("bignum time beyond float64", "manifest", {"deadline": 2**1100}, ("deadline", "type")),
    ("negative bignum (tag 3) sample count", "update", {"num_samples": cbor2.CBORTag(3, b"\x0c")},
     ("num_samples", "type")),
    ("shareable (tag 28) text", "status", {"peer": cbor2.CBORTag(28, "dev-1")}, ("peer", "type")),
    ("self-described (tag 55799) bytes", "ack", {"held": cbor2.CBORTag(55799, b"\xfd\x02")}, ("held", "type")),
    ("tagged id in selected", "manifest", {"selected": ["pi-kitchen", cbor2.CBORTag(28, "pi-garage")]},
     ("selected[1]", "type")),
    ("num_samples 0", "update", {"num_samples": 0}, ("num_samples", "range")),
    ("num_samples above 2**40", "update", {"num_samples": 2**40 + 1}, ("num_samples", "range")),
    ("count 0", "ack", {"count": 0}, ("count", "range")),
    ("index 65536", "model", {"index": 65536}, ("index", "range")),
    ("update_qos 0", "manifest", {"update_qos": 0}, ("update_qos", "range")),
    ("update_qos 3", "manifest", {"update_qos": 3}, ("update_qos", "range")),
    ("delta_from -2", "manifest", {"delta_from": -2}, ("delta_from", "range")),
    ("base -2", "model", {"base": -2}, ("base", "range")),
    ("incarnation 2**63", "status", {"incarnation": 2**63}, ("incarnation", "range")),
    ("negative incarnation", "status", {"incarnation": -1}, ("incarnation", "range")),
    ("negative deadline", "manifest", {"deadline": -1.0}, ("deadline", "range")),
    ("deadline above 10**12", "manifest", {"deadline": 1e13}, ("deadline", "range")),
    ("NaN deadline", "manifest", {"deadline": math.nan}, ("deadline", "not_finite")),
    ("infinite deadline", "manifest", {"deadline": math.inf}, ("deadline", "not_finite")),
    ("NaN metric", "update", {"metrics": {"train_loss": math.nan}}, ("metrics[train_loss]", "not_finite")),
    ("-inf hyper-parameter", "manifest", {"hyper": {"lr": -math.inf}}, ("hyper[lr]", "not_finite")),
    ("text metric", "update", {"metrics": {"train_loss": "0.5"}}, ("metrics[train_loss]", "type")),
    ("33 metrics", "update", {"metrics": {f"m{i}": 1.0 for i in range(33)}}, ("metrics", "size")),
    ("id with a slash", "update", {"device": "pi/kitchen"}, ("device", "format")),
    ("id with a wildcard", "ack", {"update_id": "u+"}, ("update_id", "format")),
    ("id with a final newline", "status", {"peer": "dev-1\n"}, ("peer", "format")),
    ("id of 65 characters", "update", {"update_id": "u" * 65}, ("update_id", "format")),
    ("empty id", "status", {"peer": ""}, ("peer", "format")),
    ("non-ASCII id", "manifest", {"federation": "färm"}, ("federation", "format")),
    ("bad id in selected", "manifest", {"selected": ["pi-kitchen", "pi garage"]}, ("selected[1]", "format")),
    ("codec name of 33 bytes", "update", {"codec": "c" * 33}, ("codec", "size")),
    ("codec name of 17 two-byte characters", "model", {"codec": "é" * 17}, ("codec", "size")),
    ("reason of 201 bytes", "ack", {"reason": "r" * 201}, ("reason", "size")),
    ("digest of 15 bytes", "update", {"update_digest": bytes(15)}, ("update_digest", "size")),
    ("digest of 17 bytes", "manifest", {"model_digest": bytes(17)}, ("model_digest", "size")),
    ("signature of 65 bytes", "update", {"signature": bytes(65)}, ("signature", "size")),
    ("param name of 129 bytes", "manifest", {"param_spec": [["p" * 129, [16]]]}, ("param_spec[0].name", "size")),
    ("float in a shape", "manifest", {"param_spec": [["b", [4.0]], ["w", [3, 4]]]}, ("param_spec[0].shape[0]", "type")),
    ("shape of 9 dimensions", "manifest", {"param_spec": [["w", [1] * 9]]}, ("param_spec[0].shape", "size")),
    ("param entry of 3 items", "manifest", {"param_spec": [["w", [16], 0]]}, ("param_spec[0]", "type")),
    ("unknown state", "manifest", {"state": "closed"}, ("state", "value")),
    ("unknown receipt status", "ack", {"status": "ok"}, ("status", "value")),
    ("unknown peer state", "status", {"state": "away"}, ("state", "value")),
    ("schema version 2", "ack", {"v": 2}, ("v", "schema_version")),
    ("schema version 1.0", "ack", {"v": 1.0}, ("v", "schema_version")),
    ("schema version true", "status", {"v": True}, ("v", "schema_version")),
    ("schema version as text", "status", {"v": "1"}, ("v", "schema_version")),
    ("no schema version", "model", {"v": DROP}, ("v", "schema_version")),
    ("unknown kind", "update", {"t": "updates"}, ("t", "value")),
    ("kind as bytes", "update", {"t": b"update"}, ("t", "value")),
    ("unknown key", "status", {"since": 3}, ("since", "unknown_field")),
    ("missing required key", "update", {"update_digest": DROP}, ("update_digest", "missing")),
    ("missing selected", "manifest", {"selected": DROP}, ("selected", "missing")),
]


# Rules of protocol.cddl that pycddl 0.6.4 does not check; the decoder does. The verdict is
# pinned so that this list stays true (the dependency is pinned below 0.7).
DECODER_ONLY = [
    # the dialect checks map keys as plain text (cddl-rs applies no control to a key)
    ("metric name of 33 bytes", "update", {"metrics": {"x" * 33: 1.0}}, ("metrics.key", "size")),
    ("hyper-parameter name of 33 bytes", "manifest", {"hyper": {"h" * 33: 1.0}}, ("hyper.key", "size")),
    # cddl-rs matches a CBOR bignum (tag 2/3) against an unbounded `int`; RFC 8610 does not
    # (`int` is major type 0/1, a bignum is `biguint`). The decoder refuses every tag (beyond
    # float64 such a metric once escaped decode as OverflowError, ending the coordinator).
    ("bignum metric beyond float64", "update", {"metrics": {"x": 2**1100}}, ("metrics[x]", "type")),
    ("bignum hyper-parameter beyond float64", "manifest", {"hyper": {"lr": -(2**1100)}}, ("hyper[lr]", "type")),
    ("bignum (tag 2) for a small integer", "ack", {"round_id": cbor2.CBORTag(2, b"\x0c")}, ("round_id", "type")),
    ("bignum metric", "update", {"metrics": {"train_loss": cbor2.CBORTag(2, b"\x01")}}, ("metrics[train_loss]", "type")),
    # `tstr .size` inside an array keeps cddl-rs's type confusion (see DIALECT)
    ("bytes for a parameter name", "manifest", {"param_spec": [[b"b", [4]], ["w", [3, 4]]]},
     ("param_spec[0].name", "type")),
]


CROSS_FIELD = [
    ("index >= count", "model", {"index": 2}, ("index", "range")),
    ("slice past the vector", "update", {"offset": 12}, ("length", "range")),
    ("held of the wrong length", "ack", {"held": b"\xfd"}, ("held", "size")),
    ("quorum above target", "manifest", {"quorum": 4}, ("quorum", "range")),
    ("open round with nobody selected", "manifest", {"selected": []}, ("quorum", "range")),
    ("shapes that do not add up", "manifest", {"num_params": 17, "model_shards": 3}, ("num_params", "mismatch")),
    ("wrong model shard count", "manifest", {"model_shards": 3}, ("model_shards", "mismatch")),
    ("deadline before issue", "manifest", {"deadline": 1_717_999_999.0}, ("deadline", "range")),
    ("param names out of order", "manifest", {"param_spec": [["w", [3, 4]], ["b", [4]]]}, ("param_spec[1].name", "order")),
    ("a param name twice", "manifest", {"param_spec": [["b", [4]], ["b", [3, 4]]]}, ("param_spec[1].name", "repeated")),
    ("param names sorted by code point, not case", "manifest", {"param_spec": [["b", [4]], ["W", [3, 4]]]},
     ("param_spec[1].name", "order")),
    ("a device selected twice", "manifest", {"selected": ["pi-garage", "pi-kitchen", "pi-garage"]},
     ("selected[2]", "repeated")),
]
