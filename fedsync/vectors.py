"""Conformance vectors: the wire format worked through, for implementations in other languages.

``python -m fedsync.vectors --out docs/vectors`` writes them; ``--check docs/vectors`` says
whether a directory holds exactly what this build generates. :func:`build` returns every
file as bytes; it is a pure function of the code (fixed values, fixed keys, deterministic
codecs), so the files in the repository can be compared byte for byte with a fresh build
(tests/test_vectors.py), and decoded with the real decoder.

Why a module of the contract package and not a script: the vectors *are* the contract, so
they are made with the contract's own encoder, codecs and signers and nothing above them
(tests/test_layering.py keeps it so); tests import :func:`build` directly; and an installed
wheel (a device build) can regenerate and check them without a checkout.

What each file holds is in the README it writes (``README`` below). Every payload is the
complete MQTT payload (``payload_hex``) with its topic and its CBOR map as JSON
(``message``: byte strings as ``{"hex": ...}``) and in CBOR diagnostic notation.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
import zstandard

from fedsync.codecs import get_codec
from fedsync.messages import ModelShard, PeerStatus, RoundManifest, ShardAck, UpdateShard, decode, encode
from fedsync.params import digest, flatten, shard_slices, shards_digest, spec_of, update_digest, vector_digest
from fedsync.signing import DOMAIN, Ed25519Signer, HmacSigner, signing_message
from fedsync.topics import Topics

FEDERATION = "vectors"
DEVICE = "dev-7"
ROUND_ID = 7
UPDATE_ID = "u00000000002a"
BASE_VERSION = 4
NUM_SAMPLES = 120
SHARD_VALUES = 8  # float32 values per shard, model and updates (the manifest's shard_values)
UPDATE_CODECS = ("raw", "zstd", "fp16", "int8", "topk", "topk1")
# A delta with what codecs must get right: signed zeros, tiny and large magnitudes, ties.
DELTA = np.array([0.0, -0.0, 1.0, -1.0, 0.5, -0.25, 0.1, -0.3, 1e-6, -2.5e-5, 3.0, -7.75, 100.0, 0.0,
                  2.0**-20, 0.125, -0.001, 12.5, -0.0625, 0.75], dtype=np.float32)
METRICS = {"train_loss": 0.6931}
MODEL_CODEC = "zstd"
# Model version 3 (20 values, like DELTA); version 4 = version 3 + STEP, exactly in float32.
OLD_MODEL = {"b": np.array([0.5, -0.5, 0.25, 0.0], np.float32),
             "w": (np.arange(16, dtype=np.float32).reshape(4, 4) / 32 - 0.25).astype(np.float32)}
STEP = np.array([0.01, 0.0, -0.02, 0.005, 0.0, 0.0, 0.001, -0.001, 0.0, 0.25,
                 0.0, 0.0, 0.0, 0.0, -0.125, 0.0, 0.0, 0.0, 0.0, 0.0], np.float32)
COORDINATOR_INCARNATION = 1_718_000_000_123_456_789  # time.time_ns() at the coordinator's start
ISSUED_AT, DEADLINE = 1_718_000_000.5, 1_718_000_060.5
# Fixed test keys: never use them for anything else. Ed25519: RFC 8032 §7.1, TEST 1.
HMAC_KEY = bytes(range(32))
ED25519_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")

TOPICS = Topics(FEDERATION)
LIBZSTD = ".".join(map(str, zstandard.ZSTD_VERSION))


# -- how a value is written in the JSON files ------------------------------------------------

def jsonable(value: Any) -> Any:
    """A decoded CBOR value as JSON: byte strings become ``{"hex": ...}``."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"hex": bytes(value).hex()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return value


def diagnostic(value: Any) -> str:
    """RFC 8949 §8 diagnostic notation of a decoded CBOR value (as this encoder writes it)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"h'{bytes(value).hex()}'"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (int, str)):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(diagnostic(v) for v in value) + "]"
    return "{" + ", ".join(f"{diagnostic(k)}: {diagnostic(v)}" for k, v in value.items()) + "}"


def payload_entry(topic: str, payload: bytes, **extra: Any) -> dict[str, Any]:
    body = cbor2.loads(payload)
    decode(payload)  # every vector is a valid message
    return {**extra, "topic": topic, "payload_hex": payload.hex(), "message": jsonable(body),
            "diagnostic": diagnostic(body)}


def floats(vector: np.ndarray) -> list[float]:
    return [float(x) for x in np.asarray(vector, np.float32)]


def f32_hex(vector: np.ndarray) -> str:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes().hex()


def frame_contents(codec: str, data: bytes) -> list[str]:
    """What each zstd frame of ``data`` holds (hex), so an encoder whose zstd compresses
    differently can still compare its bytes before compression."""
    if codec == "raw":
        return []
    if codec.startswith("topk"):
        (split,) = struct.unpack_from("<I", data)
        frames = [data[4:4 + split], data[4 + split:]]
    else:
        frames = [data]
    return [zstandard.ZstdDecompressor().decompress(f).hex() for f in frames]


# -- the vectors ------------------------------------------------------------------------------

def update_shards(codec_name: str, signature: bytes = b"") -> tuple[list[UpdateShard], np.ndarray]:
    """The shards of DELTA's update under ``codec_name`` and the decoded delta."""
    codec = get_codec(codec_name)
    slices = shard_slices(DELTA.size, SHARD_VALUES)
    datas = [codec.encode(DELTA[off:off + n]) for off, n in slices]
    whole = update_digest((digest(d) for d in datas), federation=FEDERATION, device=DEVICE, round_id=ROUND_ID,
                          update_id=UPDATE_ID, base_version=BASE_VERSION, base_digest=base_digest())
    shards = [UpdateShard(DEVICE, ROUND_ID, UPDATE_ID, BASE_VERSION, i, len(slices), off, n, DELTA.size, codec_name,
                          NUM_SAMPLES, digest(d), whole, d, METRICS, signature)
              for i, ((off, n), d) in enumerate(zip(slices, datas))]
    decoded = np.concatenate([codec.decode(d, n) for (_, n), d in zip(slices, datas)])
    return shards, decoded


def base_digest() -> bytes:
    """The digest of model version BASE_VERSION (model.json), the base every update is bound to."""
    return vector_digest(_model_vectors()[2])


def update_vector(codec_name: str) -> dict[str, Any]:
    shards, decoded = update_shards(codec_name)
    out: dict[str, Any] = {
        "what": f"an update (the delta below) coded with {codec_name!r}, in {len(shards)} UpdateShards",
        "codec": codec_name, "federation": FEDERATION, "device": DEVICE, "round_id": ROUND_ID,
        "update_id": UPDATE_ID, "base_version": BASE_VERSION, "num_samples": NUM_SAMPLES,
        "num_params": int(DELTA.size), "shard_values": SHARD_VALUES,
        "delta": floats(DELTA), "delta_f32le_hex": f32_hex(DELTA),
        "decoded": floats(decoded), "decoded_f32le_hex": f32_hex(decoded),
        "lossless": get_codec(codec_name).lossless,
    }
    if codec_name != "raw":
        out["libzstd"] = LIBZSTD
    out["shards"] = [
        payload_entry(TOPICS.up(s.device, s.round_id, s.update_id, s.index), encode(s), index=s.index,
                      offset=s.offset, length=s.length, data_hex=s.data.hex(),
                      frame_contents_hex=frame_contents(codec_name, s.data), digest_hex=s.digest.hex())
        for s in shards]
    out["base_digest_hex"] = base_digest().hex()
    out["shards_digest_hex"] = shards_digest(s.digest for s in shards).hex()
    out["update_digest_hex"] = shards[0].update_digest.hex()
    return out


def _model_vectors() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    old = flatten(OLD_MODEL)
    new = (old + STEP).astype(np.float32)  # the new model is defined as old + step, exactly
    return old, STEP.copy(), new


def model_shard_entries(vector: np.ndarray, version: int, base: int = -1) -> list[dict[str, Any]]:
    codec = get_codec(MODEL_CODEC)
    entries = []
    slices = shard_slices(vector.size, SHARD_VALUES)
    for i, (off, n) in enumerate(slices):
        data = codec.encode(vector[off:off + n])
        shard = ModelShard(version, i, len(slices), off, n, vector.size, MODEL_CODEC, digest(data), data, base)
        topic = TOPICS.model(version, i) if base < 0 else TOPICS.model_delta(base, version, i)
        entries.append(payload_entry(topic, encode(shard), index=i, offset=off, length=n, data_hex=data.hex(),
                                     frame_contents_hex=frame_contents(MODEL_CODEC, data),
                                     digest_hex=digest(data).hex()))
    return entries


def model_vector() -> dict[str, Any]:
    _, _, new = _model_vectors()
    params = {"b": new[:4], "w": new[4:].reshape(4, 4)}
    return {
        "what": f"global model version {BASE_VERSION} in {SHARD_VALUES}-value ModelShards",
        "version": BASE_VERSION, "codec": MODEL_CODEC, "shard_values": SHARD_VALUES, "libzstd": LIBZSTD,
        "param_spec": [[name, list(shape)] for name, shape in spec_of(params)],
        "params": {name: np.asarray(v, np.float64).tolist() for name, v in params.items()},
        "vector": floats(new), "vector_f32le_hex": f32_hex(new),
        "model_digest_hex": vector_digest(new).hex(),
        "shards": model_shard_entries(new, BASE_VERSION),
    }


def delta_vector() -> dict[str, Any]:
    old, step, new = _model_vectors()
    return {
        "what": (f"the delta download from version {BASE_VERSION - 1} to {BASE_VERSION}: a device holding "
                 f"version {BASE_VERSION - 1} adds the decoded delta in float32 and gets model.json's vector"),
        "base": BASE_VERSION - 1, "version": BASE_VERSION, "codec": MODEL_CODEC,
        "shard_values": SHARD_VALUES, "libzstd": LIBZSTD,
        "old_vector": floats(old), "old_vector_f32le_hex": f32_hex(old),
        "old_model_digest_hex": vector_digest(old).hex(),
        "delta": floats(step), "delta_f32le_hex": f32_hex(step),
        "new_vector_f32le_hex": f32_hex(new), "model_digest_hex": vector_digest(new).hex(),
        "shards": model_shard_entries(step, BASE_VERSION, base=BASE_VERSION - 1),
    }


def manifest_vector() -> dict[str, Any]:
    _, _, new = _model_vectors()
    spec = spec_of(OLD_MODEL)
    base = dict(federation=FEDERATION, round_id=ROUND_ID, incarnation=COORDINATOR_INCARNATION, state="open",
                mode="sync", model_version=BASE_VERSION, model_digest=vector_digest(new), model_codec=MODEL_CODEC,
                model_shards=len(shard_slices(new.size, SHARD_VALUES)), param_spec=spec,
                num_params=int(new.size), shard_values=SHARD_VALUES, update_codec="zstd", update_qos=1,
                deadline=DEADLINE, issued_at=ISSUED_AT, quorum=2, target=3, selected=("dev-5", "dev-6", DEVICE),
                hyper={"lr": 0.1, "epochs": 1.0, "batch_size": 32.0, "mu": 0.0}, delta_from=BASE_VERSION - 1,
                resend_after=10.0)
    idle = {"quorum": 0, "target": 0, "selected": (), "deadline": ISSUED_AT}  # as the coordinator writes it
    states = [("open", {}), ("waiting", idle), ("finished", idle)]
    return {
        "what": "retained round manifests: round 7 open on model.json's model (a delta from version 3 published), "
                "the round the update-*.json files answer (each as if update_codec named its codec); then "
                "waiting and finished",
        "manifests": [payload_entry(TOPICS.manifest, encode(RoundManifest(**{**base, "state": s, **over})), state=s)
                      for s, over in states],
    }


def receipts_vector() -> dict[str, Any]:
    cases = [("partial", 10, [0, 2, 3, 4, 5, 6, 7, 9], ""), ("accepted", 3, [0, 1, 2], ""),
             ("duplicate", 3, [], ""), ("rejected", 3, [], "update_digest:update_digest"),
             ("closed", 3, [], "round is not open"), ("refused", 3, [0, 1, 2], "norm_bound")]
    entries = []
    for status, count, held, reason in cases:
        bits = bytearray((count + 7) // 8)
        for i in held:
            bits[i // 8] |= 1 << (i % 8)
        ack = ShardAck(DEVICE, ROUND_ID, UPDATE_ID, count, bytes(bits), status, reason)
        entries.append(payload_entry(TOPICS.ack(DEVICE), encode(ack), status=status, held_indices=held))
    return {"what": "one retained ShardAck per status (held: bit i of byte i div 8, LSB first)", "receipts": entries}


def status_vector() -> dict[str, Any]:
    cases = [(TOPICS.status(DEVICE), PeerStatus(DEVICE, "online"), "a device connects (retained)"),
             (TOPICS.status(DEVICE), PeerStatus(DEVICE, "offline"), "its last will"),
             (TOPICS.coordinator_status, PeerStatus("coordinator", "online", COORDINATOR_INCARNATION),
              "the coordinator's status: incarnation above 2**53"),
             (TOPICS.coordinator_status, PeerStatus("coordinator", "offline", COORDINATOR_INCARNATION),
              "the coordinator's last will")]
    return {"what": "retained PeerStatus messages",
            "statuses": [payload_entry(topic, encode(s), when=when) for topic, s, when in cases]}


def signing_vector() -> dict[str, Any]:
    plain, _ = update_shards("raw")
    whole = plain[0].update_digest
    msg = signing_message(FEDERATION, DEVICE, ROUND_ID, UPDATE_ID, whole, NUM_SAMPLES)
    ed = Ed25519Signer(ED25519_SEED)
    schemes = {}
    for name, key_fields, signer in (("hmac-sha256", {"key_hex": HMAC_KEY.hex()}, HmacSigner(HMAC_KEY)),
                                     ("ed25519", {"private_key_hex": ED25519_SEED.hex(),
                                                  "public_key_hex": ed.public_key_bytes().hex()}, ed)):
        sig = signer.sign(msg)
        shards, _ = update_shards("raw", sig)
        schemes[name] = {**key_fields, "signature_hex": sig.hex(), "shards": [
            payload_entry(TOPICS.up(s.device, s.round_id, s.update_id, s.index), encode(s), index=s.index)
            for s in shards]}
    return {
        "what": "update-raw.json's update, signed: the signing message, its HMAC-SHA256 and Ed25519 signatures "
                "with fixed test keys, and the shards carrying each signature",
        "domain_hex": DOMAIN.hex(), "domain": DOMAIN.decode("ascii").replace("\x00", "\\0"),
        "federation": FEDERATION, "device": DEVICE, "round_id": ROUND_ID, "update_id": UPDATE_ID,
        "base_version": BASE_VERSION, "base_digest_hex": base_digest().hex(),  # bound by the update digest
        "update_digest_hex": whole.hex(), "num_samples": NUM_SAMPLES,
        "signing_message_hex": msg.hex(), **schemes,
    }


README = """# fedsync conformance vectors (schema version 1)

Generated by `python -m fedsync.vectors --out docs/vectors` (fedsync/vectors.py); checked by
tests/test_vectors.py both ways (regenerated byte for byte, and every payload decoded by the real
decoder). Do not edit by hand. The spec is ../protocol.md and ../protocol.cddl.

| file | what |
|---|---|
{files}

Conventions: hex is lowercase; `*_f32le_hex` is a float32 vector as little-endian bytes (exact;
the JSON numbers beside it are the same values printed as float64). Every payload entry has the
MQTT `topic`, the complete payload (`payload_hex`), its CBOR map as JSON (`message`: a byte
string is `{{"hex": ...}}`; integers above 2^53, such as `incarnation`, need a BigInt-aware JSON
reader, or read them from the payload) and in CBOR diagnostic notation (`diagnostic`).

How to test an implementation with these files alone:

* decoder: decode every `payload_hex` and compare with `message`; check `digest_hex` =
  SHA-256(data)[:16], `shards_digest_hex` = SHA-256(shard digests in index order)[:16],
  `update_digest_hex` = SHA-256(`fedsync/update-digest/v1\\0`, federation, device, round id, update id,
  base version, `base_digest_hex`, shards digest: protocol.md "Digests")[:16], decode
  each shard's data with the codec and compare with `decoded_f32le_hex` (models: with
  `vector_f32le_hex` and `model_digest_hex` = SHA-256(vector as float32 LE)[:16]);
* encoder: an encoder that writes CBOR the way ours does (protocol.md, "Encoding rules": key
  order, shortest integers, float64) reproduces every raw-codec payload, receipt, status and
  manifest byte for byte; any other valid encoding is accepted too. The signing message is
  fixed byte for byte. zstd output depends on the
  zstd library and its version (these were made with libzstd {libzstd}, level 1): compare the bytes
  *before* compression with `frame_contents_hex` instead, and check that your zstd frames declare
  their content size. Digests and signatures cover the bytes you actually send;
* signatures: recompute `signing_message_hex` from the fields, then both signatures from the keys.
"""

FILES = {
    **{f"update-{c}.json": (lambda c=c: update_vector(c), f"an update coded with `{c}`: delta -> codec bytes -> "
                            "shard digests -> update digest -> every UpdateShard payload") for c in UPDATE_CODECS},
    "model.json": (model_vector, "a model (param_spec, vector) -> ModelShards (zstd) -> model digest"),
    "model-delta.json": (delta_vector, "the delta download from the previous version (ModelShards with `base`)"),
    "manifest.json": (manifest_vector, "RoundManifests: open (naming model.json and the delta), waiting, finished"),
    "receipts.json": (receipts_vector, "a ShardAck for every status"),
    "status.json": (status_vector, "PeerStatus of a device and of the coordinator, online and last will"),
    "signing.json": (signing_vector, "the signing message, HMAC-SHA256 and Ed25519 signatures, signed shards"),
}


def build() -> dict[str, bytes]:
    """Every vector file, name -> content."""
    out = {name: (json.dumps(make(), indent=1, ensure_ascii=True) + "\n").encode("ascii")
           for name, (make, _) in FILES.items()}
    table = "\n".join(f"| [{name}]({name}) | {what} |" for name, (_, what) in FILES.items())
    out["README.md"] = README.format(files=table, libzstd=LIBZSTD).encode("utf-8")
    return out


def differences(directory: Path, built: dict[str, bytes] | None = None) -> list[str]:
    """The files of ``directory`` that differ from a fresh build (or are missing or extra)."""
    built = build() if built is None else built
    present = {p.name for p in directory.iterdir() if p.is_file()} if directory.is_dir() else set()
    problems = [f"{name}: missing" for name in sorted(set(built) - present)]
    problems += [f"{name}: not generated by fedsync.vectors" for name in sorted(present - set(built))]
    problems += [f"{name}: differs from a fresh build" for name in sorted(set(built) & present)
                 if (directory / name).read_bytes() != built[name]]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedsync.vectors", description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--out", type=Path, help="write the vector files into this directory (created if needed)")
    group.add_argument("--check", type=Path, help="exit 1 unless this directory holds exactly a fresh build")
    args = parser.parse_args(argv)
    if args.check is not None:
        problems = differences(args.check)
        for line in problems:
            print(f"{args.check}/{line}", file=sys.stderr)
        return 1 if problems else 0
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, content in build().items():
            (args.out / name).write_bytes(content)
    except OSError as exc:
        print(f"--out {args.out}: cannot write: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
