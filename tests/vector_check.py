"""The checker of docs/vectors for tests/test_vectors.py: every payload, digest, frame,
decoded vector, model step and signature recomputed independently of fedsync.vectors
(hashlib, hmac, cryptography, numpy byte planes) and compared with the files and across them.
:func:`problems` returns what is wrong with one file (empty: nothing)."""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from dataclasses import fields
from pathlib import Path

import cbor2
import numpy as np
import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedsync import vectors
from fedsync.codecs import get_codec
from fedsync.codecs.lossy import topk_error_bound
from fedsync.errors import ProtocolError
from fedsync.messages import ACK_STATES, ModelShard, PeerStatus, ShardAck, UpdateShard, decode, encode
from fedsync.topics import Topics

VECTORS = Path(__file__).resolve().parents[1] / "docs" / "vectors"
NAMES = sorted(p.name for p in VECTORS.glob("*.json"))
TOPICS = Topics("vectors")
DOMAIN = b"fedsync/update-signature/v1\x00"  # docs/security.md


def stored() -> dict[str, dict]:
    return {name: json.loads((VECTORS / name).read_text(encoding="ascii")) for name in NAMES}


def hx(text: str) -> bytes:
    return bytes.fromhex(text)


def f32(text: str) -> np.ndarray:
    return np.frombuffer(hx(text), dtype="<f4").astype(np.float32)


def sha16(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()[:16]


def planes(raw: bytes, width: int) -> bytes:
    """Byte-shuffle as protocol.md states it: plane k holds byte k of every value."""
    return b"".join(raw[k::width] for k in range(width))


def as_json(value):
    if isinstance(value, (bytes, memoryview)):
        return {"hex": bytes(value).hex()}
    if isinstance(value, (list, tuple)):
        return [as_json(v) for v in value]
    if isinstance(value, dict):
        return {k: as_json(v) for k, v in value.items()}
    return value


def topic_of(msg) -> str:
    if isinstance(msg, UpdateShard):
        return TOPICS.up(msg.device, msg.round_id, msg.update_id, msg.index)
    if isinstance(msg, ModelShard):
        return TOPICS.model(msg.version, msg.index) if msg.base < 0 else TOPICS.model_delta(msg.base, msg.version,
                                                                                            msg.index)
    if isinstance(msg, ShardAck):
        return TOPICS.ack(msg.device)
    if isinstance(msg, PeerStatus):
        return TOPICS.coordinator_status if msg.peer == "coordinator" else TOPICS.status(msg.peer)
    return TOPICS.manifest


# -- the checker ---------------------------------------------------------------------------

def entry_problems(e: dict) -> list[str]:
    """One payload entry: decodes to ``message``, re-encodes to the same bytes, right topic."""
    payload = hx(e["payload_hex"])
    try:
        msg = decode(payload)
    except ProtocolError as err:
        return [f"{e['topic']}: payload does not decode: {err}"]
    out = []
    wire = {"v": 1, "t": msg.KIND, **{f.name: as_json(getattr(msg, f.name)) for f in fields(msg)
                                      if getattr(msg, f.name) is not None}}  # None: not written
    if wire != e["message"] or as_json(cbor2.loads(payload)) != e["message"]:
        out.append(f"{e['topic']}: payload and message differ")
    if vectors.diagnostic(cbor2.loads(payload)) != e["diagnostic"]:
        out.append(f"{e['topic']}: diagnostic differs")
    if encode(msg) != payload:
        out.append(f"{e['topic']}: the payload is not what the encoder writes for its message")
    if topic_of(msg) != e["topic"]:
        out.append(f"{e['topic']}: the message belongs on {topic_of(msg)}")
    return out


def frames(codec: str, data: bytes) -> list[bytes]:
    if codec == "raw":
        return []
    if codec.startswith("topk"):
        (split,) = struct.unpack_from("<I", data)
        return [data[4:4 + split], data[4 + split:]]
    return [data]


def content_problems(codec: str, contents: list[bytes], values: np.ndarray, decoded: np.ndarray) -> list[str]:
    """The bytes before compression, rebuilt from protocol.md's description of each codec."""
    raw = np.ascontiguousarray(values, "<f4").tobytes()
    if codec == "zstd" and contents != [planes(raw, 4)]:
        return ["zstd frame does not hold the 4 byte planes of the float32 values"]
    if codec == "fp16" and contents != [planes(values.astype("<f2").tobytes(), 2)]:
        return ["fp16 frame does not hold the 2 byte planes of the float16 values"]
    if codec == "int8":
        chunks = -(-values.size // 4096)
        scales = np.frombuffer(contents[0][:4 * chunks], "<f4")
        codes = np.frombuffer(contents[0][4 * chunks:], np.int8)
        if codes.size != values.size or not np.array_equal(codes * np.repeat(scales, 4096)[:values.size], decoded):
            return ["int8 frame is not [scales f32][codes int8] of the decoded values"]
    if codec.startswith("topk"):
        raw_deltas = contents[0]
        k = len(raw_deltas) // 4
        gaps = np.frombuffer(bytes(b for i in range(k) for b in raw_deltas[i::k]), "<u4")
        (shift,) = struct.unpack_from("<h", contents[1])
        halves = np.frombuffer(bytes(b for i in range(k) for b in contents[1][2:][i::k]), "<f2")
        rebuilt = np.zeros(values.size, np.float32)
        rebuilt[np.cumsum(gaps)] = np.ldexp(halves.astype(np.float32), -shift)
        if not np.array_equal(rebuilt, decoded):
            return ["top-k frames are not [index gaps u32, shuffled] and [shift i16][fp16 values, shuffled]"]
    return []


def slice_problems(e: dict, msg, codec: str, values: np.ndarray) -> tuple[list[str], np.ndarray]:
    data = hx(e["data_hex"])
    out = []
    if bytes(msg.data) != data or msg.digest != sha16(data) or hx(e["digest_hex"]) != msg.digest:
        out.append(f"shard {msg.index}: data, digest_hex and the payload's digest disagree")
    if (e["index"], e["offset"], e["length"]) != (msg.index, msg.offset, msg.length) or msg.codec != codec:
        out.append(f"shard {msg.index}: index/offset/length/codec differ from the payload")
    found = [zstandard.ZstdDecompressor().decompress(f) for f in frames(codec, data)]
    declared = [zstandard.get_frame_parameters(f).content_size for f in frames(codec, data)]
    if [c.hex() for c in found] != e["frame_contents_hex"] or declared != [len(c) for c in found]:
        out.append(f"shard {msg.index}: zstd frames (or their declared sizes) differ from frame_contents_hex")
    decoded = get_codec(codec).decode(data, msg.length)
    return out + content_problems(codec, found, values, decoded), decoded


def check_update(d: dict, files: dict[str, dict]) -> list[str]:
    out = []
    m = decode(hx(files["manifest.json"]["manifests"][0]["payload_hex"]))
    delta = f32(d["delta_f32le_hex"])
    if delta.tobytes() != np.array(d["delta"], np.float32).tobytes() or \
            delta.tobytes() != f32(files["update-raw.json"]["decoded_f32le_hex"]).tobytes():
        out.append("delta differs from its numbers or from update-raw.json's")
    if (d["round_id"], d["base_version"], d["num_params"], d["shard_values"]) != (
            m.round_id, m.model_version, m.num_params, m.shard_values) or d["federation"] != m.federation:
        out.append("the update does not answer manifest.json's open round")
    codec = d["codec"]
    decoded, digests = [], []
    for i, e in enumerate(d["shards"]):
        out += entry_problems(e)
        msg = decode(hx(e["payload_hex"]))
        layout = (i, i * m.shard_values, len(d["shards"]), m.num_params)
        if (msg.index, msg.offset, msg.count, msg.num_params) != layout or (
                msg.device, msg.round_id, msg.update_id, msg.base_version, msg.num_samples) != (
                d["device"], d["round_id"], d["update_id"], d["base_version"], d["num_samples"]):
            out.append(f"shard {i}: fields differ from the file's")
        found, piece = slice_problems(e, msg, codec, delta[msg.offset:msg.offset + msg.length])
        out += found
        decoded.append(piece)
        digests.append(sha16(hx(e["data_hex"])))
        if msg.update_digest != hx(d["update_digest_hex"]):
            out.append(f"shard {i}: update_digest differs from update_digest_hex")
    text = lambda s: struct.pack(">H", len(s.encode())) + s.encode()  # noqa: E731
    base = hx(d["base_digest_hex"])
    if base != m.model_digest or d["base_digest_hex"] != files["model.json"]["model_digest_hex"]:
        out.append("base_digest_hex is not the digest of manifest.json's (model.json's) model")
    shards = sha16(b"".join(digests))
    if shards != hx(d["shards_digest_hex"]):
        out.append("shards_digest_hex is not the digest of the shard digests")
    # protocol.md, "Digests": the update digest binds the update to its federation, device, round, id and base.
    binding = (b"fedsync/update-digest/v1\x00" + text(d["federation"]) + text(d["device"])
               + struct.pack(">Q", d["round_id"]) + text(d["update_id"]) + struct.pack(">Q", d["base_version"])
               + struct.pack(">B", len(base)) + base + shards)
    if sha16(binding) != hx(d["update_digest_hex"]):
        out.append("update_digest_hex is not the digest of the documented binding")
    got = np.concatenate(decoded)
    if got.tobytes() != f32(d["decoded_f32le_hex"]).tobytes() or \
            got.tobytes() != np.array(d["decoded"], np.float32).tobytes():
        out.append("decoded_f32le_hex (or decoded) is not what the shards decode to")
    c = get_codec(codec)
    if d["lossless"] != c.lossless:
        out.append("lossless flag wrong")
    elif c.lossless and got.tobytes() != delta.tobytes():
        out.append("a lossless codec did not reproduce the delta")
    elif codec.startswith("topk"):
        kept = np.flatnonzero(got)
        if not (np.abs(got - delta)[kept] <= topk_error_bound(delta, kept)).all():
            out.append("top-k kept values beyond their bound")
    elif not c.lossless and not (np.abs(got - delta) <= c.error_bound(delta)).all():
        out.append(f"{codec} decoded values beyond the codec's bound")
    return out


def check_model_shards(d: dict, expect: np.ndarray, version: int, base: int) -> list[str]:
    out, pieces = [], []
    for i, e in enumerate(d["shards"]):
        out += entry_problems(e)
        msg = decode(hx(e["payload_hex"]))
        if (msg.index, msg.offset, msg.version, msg.base, msg.codec) != (i, i * d["shard_values"], version, base,
                                                                          d["codec"]):
            out.append(f"shard {i}: layout, version, base or codec wrong")
        found, piece = slice_problems(e, msg, d["codec"], expect[msg.offset:msg.offset + msg.length])
        out += found
        pieces.append(piece)
    if np.concatenate(pieces).tobytes() != expect.tobytes():
        out.append("the shards do not decode to the vector")
    return out


def check_model(d: dict, files: dict[str, dict]) -> list[str]:
    out = []
    m = decode(hx(files["manifest.json"]["manifests"][0]["payload_hex"]))
    vector = f32(d["vector_f32le_hex"])
    flat = np.concatenate([np.array(d["params"][name], np.float32).reshape(shape).reshape(-1)
                           for name, shape in d["param_spec"]])
    if vector.tobytes() != np.array(d["vector"], np.float32).tobytes() or flat.tobytes() != vector.tobytes():
        out.append("vector differs from its numbers or from params flattened in param_spec order")
    if [list(e) for e in d["param_spec"]] != [[n, list(s)] for n, s in m.param_spec] or d["version"] != m.model_version:
        out.append("param_spec or version differ from the manifest's")
    if sha16(vector.tobytes()) != hx(d["model_digest_hex"]) or hx(d["model_digest_hex"]) != m.model_digest:
        out.append("model_digest_hex is not the digest of the vector, or not the manifest's")
    return out + check_model_shards(d, vector, d["version"], -1)


def check_delta(d: dict, files: dict[str, dict]) -> list[str]:
    out = []
    m = decode(hx(files["manifest.json"]["manifests"][0]["payload_hex"]))
    old, step, new = f32(d["old_vector_f32le_hex"]), f32(d["delta_f32le_hex"]), f32(d["new_vector_f32le_hex"])
    if old.tobytes() != np.array(d["old_vector"], np.float32).tobytes() or \
            step.tobytes() != np.array(d["delta"], np.float32).tobytes():
        out.append("old_vector or delta differ from their numbers")
    if sha16(old.tobytes()) != hx(d["old_model_digest_hex"]):
        out.append("old_model_digest_hex is not the digest of old_vector")
    if (old + step).astype(np.float32).tobytes() != new.tobytes() or \
            new.tobytes() != f32(files["model.json"]["vector_f32le_hex"]).tobytes():
        out.append("old + delta is not model.json's vector")
    if sha16(new.tobytes()) != hx(d["model_digest_hex"]) or m.model_digest != hx(d["model_digest_hex"]):
        out.append("model_digest_hex is not the new vector's, or not the manifest's")
    if (d["base"], d["version"]) != (m.delta_from, m.model_version) or d["base"] != d["version"] - 1:
        out.append("base/version differ from the manifest's delta_from/model_version")
    return out + check_model_shards(d, step, d["version"], d["base"])


def check_manifests(d: dict, files: dict[str, dict]) -> list[str]:
    out = [p for e in d["manifests"] for p in entry_problems(e)]
    states = [decode(hx(e["payload_hex"])).state for e in d["manifests"]]
    if states != [e["state"] for e in d["manifests"]] or states != ["open", "waiting", "finished"]:
        out.append("manifest states wrong")
    return out


def check_receipts(d: dict, files: dict[str, dict]) -> list[str]:
    out = [p for e in d["receipts"] for p in entry_problems(e)]
    acks = [decode(hx(e["payload_hex"])) for e in d["receipts"]]
    if tuple(a.status for a in acks) != ACK_STATES or [e["status"] for e in d["receipts"]] != list(ACK_STATES):
        out.append("not one receipt per status, in order")
    for a, e in zip(acks, d["receipts"]):
        if [i for i in range(a.count) if a.held[i // 8] >> (i % 8) & 1] != e["held_indices"]:
            out.append(f"{a.status}: held bitmap is not held_indices")
    return out


def check_statuses(d: dict, files: dict[str, dict]) -> list[str]:
    out = [p for e in d["statuses"] for p in entry_problems(e)]
    incarnations = [decode(hx(e["payload_hex"])).incarnation for e in d["statuses"]]
    if incarnations[:2] != [0, 0] or min(incarnations[2:]) <= 2**53:
        out.append("device incarnations 0, the coordinator's above 2**53")
    return out


def check_signing(d: dict, files: dict[str, dict]) -> list[str]:
    out = []
    raw = files["update-raw.json"]
    if hx(d["domain_hex"]) != DOMAIN or d["domain"] != "fedsync/update-signature/v1\\0":
        out.append("domain-separation tag differs from security.md's")
    text = lambda s: struct.pack(">H", len(s.encode())) + s.encode()  # noqa: E731
    digest = hx(d["update_digest_hex"])
    msg = (DOMAIN + text(d["federation"]) + text(d["device"]) + struct.pack(">Q", d["round_id"]) + text(d["update_id"])
           + struct.pack(">B", len(digest)) + digest + struct.pack(">Q", d["num_samples"]))
    if msg != hx(d["signing_message_hex"]):
        out.append("signing_message_hex is not the documented layout of the fields")
    if (d["federation"], d["device"], d["round_id"], d["update_id"], d["update_digest_hex"], d["num_samples"],
            d["base_version"], d["base_digest_hex"]) != (
            raw["federation"], raw["device"], raw["round_id"], raw["update_id"], raw["update_digest_hex"],
            raw["num_samples"], raw["base_version"], raw["base_digest_hex"]):
        out.append("the signed fields are not update-raw.json's")
    h, ed = d["hmac-sha256"], d["ed25519"]
    if hmac.new(hx(h["key_hex"]), msg, hashlib.sha256).digest() != hx(h["signature_hex"]):
        out.append("HMAC-SHA256 signature wrong")
    key = Ed25519PrivateKey.from_private_bytes(hx(ed["private_key_hex"]))
    if key.public_key().public_bytes_raw().hex() != ed["public_key_hex"] or key.sign(msg) != hx(ed["signature_hex"]):
        out.append("Ed25519 public key or signature wrong")
    for scheme in (h, ed):
        for e, plain in zip(scheme["shards"], raw["shards"], strict=True):
            out += entry_problems(e)
            if e["index"] != e["message"]["index"]:
                out.append(f"{e['topic']}: index differs from the payload's")
            signed = {**e["message"], "signature": plain["message"]["signature"]}
            if e["message"]["signature"] != {"hex": scheme["signature_hex"]} or signed != plain["message"]:
                out.append(f"{e['topic']}: not update-raw.json's shard with the signature")
    return out


CHECKS = {"model.json": check_model, "model-delta.json": check_delta, "manifest.json": check_manifests,
          "receipts.json": check_receipts, "status.json": check_statuses, "signing.json": check_signing}


def problems(name: str, files: dict[str, dict]) -> list[str]:
    check = check_update if name.startswith("update-") else CHECKS[name]
    try:
        return check(files[name], files)
    except Exception as exc:  # noqa: BLE001 - a vector the checker cannot even read is a problem too
        return [f"{name}: {type(exc).__name__}: {exc}"]
