"""docs/vectors against the code, in both directions.

1. The stored files are exactly what ``fedsync.vectors.build()`` makes now (byte for byte).
2. Every stored payload decodes with the real decoder to its ``message``, re-encodes to the
   same bytes and sits on its topic; every digest, frame, decoded vector, model step and
   signature is recomputed here independently (hashlib, hmac, cryptography, numpy byte
   planes) and checked against the file, and across files (the manifest names the model,
   the updates answer the manifest, the delta leads to the model).
3. A changed byte, number or text anywhere in a vector fails: ``problems`` finds every
   single-leaf change of every file, and the byte-for-byte comparison every changed byte.

The coordinator's own code accepts the vectors too: its model store publishes the same model
payloads, and its shard assembler completes every update (and checks the signatures).
"""

from __future__ import annotations

import copy
import json
import math
import random

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedsync import vectors
from fedsync.coordinator.assembler import RoundLayout, ShardAssembler
from fedsync.coordinator.model_store import model_shards
from fedsync.messages import UpdateShard, decode
from fedsync.signing import DOMAIN as SIGNING_DOMAIN
from fedsync.signing import Ed25519Verifier, HmacVerifier
from tests.vector_check import DOMAIN, NAMES, TOPICS, VECTORS, entry_problems, f32, hx, problems, stored


# -- the tests -------------------------------------------------------------------------------

def test_the_vector_set_is_complete():
    assert NAMES == sorted(["manifest.json", "model-delta.json", "model.json", "receipts.json", "signing.json",
                            "status.json"] + [f"update-{c}.json" for c in ("raw", "zstd", "fp16", "int8", "topk",
                                                                             "topk1")])
    assert (VECTORS / "README.md").is_file()


def _masked(obj):
    """A vector without what depends on the zstd library's compressed bytes."""
    if isinstance(obj, dict):
        return {k: _masked(v) for k, v in obj.items() if k not in {"data_hex", "digest_hex", "payload_hex", "message",
                                                                    "diagnostic", "update_digest_hex", "libzstd",
                                                                    "shards_digest_hex"}}
    return [_masked(v) for v in obj] if isinstance(obj, list) else obj


def build_differences(built: dict[str, bytes]) -> list[str]:
    """Files of docs/vectors that differ from ``built``. Made with another libzstd (level 1
    output is not frozen across versions), the compressed bytes and what hashes them may
    differ: then everything else, the frames' contents included, must still be identical."""
    if stored()["update-zstd.json"]["libzstd"] == json.loads(built["update-zstd.json"])["libzstd"]:
        return vectors.differences(VECTORS, built)
    out = []
    for name, content in built.items():
        old = (VECTORS / name).read_bytes()
        if name.endswith(".json") and "libzstd" in json.loads(content):
            out += [name] if _masked(json.loads(old)) != _masked(json.loads(content)) else []
        elif name != "README.md":  # the README names the libzstd
            out += [name] if old != content else []
    return out


def test_the_stored_files_are_a_fresh_build_byte_for_byte():
    assert build_differences(vectors.build()) == []


def test_with_another_libzstd_all_but_the_compressed_bytes_is_still_compared(monkeypatch):
    monkeypatch.setattr(vectors, "LIBZSTD", "0.0.0")
    built = vectors.build()
    assert vectors.differences(VECTORS, built) != []  # the version is named in the files
    assert build_differences(built) == []
    d = json.loads(built["update-zstd.json"])
    content = d["shards"][0]["frame_contents_hex"][0]
    d["shards"][0]["frame_contents_hex"][0] = f"{int(content[:2], 16) ^ 1:02x}" + content[2:]
    built["update-zstd.json"] = json.dumps(d).encode()
    raw = json.loads(built["update-raw.json"])
    raw["shards"][0]["payload_hex"] = "a1" + raw["shards"][0]["payload_hex"][2:]
    built["update-raw.json"] = json.dumps(raw).encode()
    assert build_differences(built) == ["update-raw.json", "update-zstd.json"]


@pytest.mark.parametrize("name", NAMES)
def test_every_vector_checks_out_against_the_decoder(name):
    assert problems(name, stored()) == []


def test_a_changed_byte_in_any_file_is_a_difference_from_the_build(tmp_path):
    rng = random.Random(13)
    built = vectors.build()
    for name, content in built.items():
        target = tmp_path / name
        for other, data in built.items():
            (tmp_path / other).write_bytes(data)
        assert vectors.differences(tmp_path, built) == []  # positive control
        pos = rng.randrange(len(content))
        target.write_bytes(content[:pos] + bytes([content[pos] ^ 0x01]) + content[pos + 1:])
        assert vectors.differences(tmp_path, built) == [f"{name}: differs from a fresh build"]
    (tmp_path / "extra.json").write_text("{}")
    (tmp_path / "README.md").unlink()
    assert "extra.json: not generated by fedsync.vectors" in vectors.differences(tmp_path, built)
    assert "README.md: missing" in vectors.differences(tmp_path, built)


def _payload_entries(obj):
    if isinstance(obj, dict):
        if "payload_hex" in obj:
            yield obj
        for v in obj.values():
            yield from _payload_entries(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _payload_entries(v)


def test_every_byte_of_every_payload_matters():
    checked = entries = 0
    for name, d in stored().items():
        for e in _payload_entries(d):
            entries += 1
            payload = hx(e["payload_hex"])
            assert entry_problems(e) == []
            for pos in range(len(payload)):
                bad = payload[:pos] + bytes([payload[pos] ^ 0x01]) + payload[pos + 1:]
                assert entry_problems({**e, "payload_hex": bad.hex()}), (name, e["topic"], pos)
                checked += 1
    # 6 x 3 update shards, 2 x 3 signed ones, 3 model, 3 delta, 3 manifests, 6 receipts, 4 statuses
    assert entries == 43 and checked > 9000


def _leaves(obj, path=()):
    """Paths of every leaf (number, text, flag) of a vector, descriptions excepted."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k not in ("what", "when", "libzstd"):  # prose and provenance: the byte-for-byte test covers them
                yield from _leaves(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, path + (i,))
    else:
        yield path


def _changed(value, key):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return float(np.nextafter(np.float32(value), np.float32(math.inf))) if value != 0 else 2.0**-149
    if key.endswith("hex"):  # a hex string, or an item of a list of them: change one byte
        raw = bytearray(hx(value))
        if raw:
            raw[len(raw) // 2] ^= 0x01
            return raw.hex()
    return value + "x"


@pytest.mark.parametrize("name", NAMES)
def test_every_changed_value_of_every_vector_is_found(name):
    files = stored()
    leaves = list(_leaves(files[name]))
    missed = []
    for path in leaves:
        changed = copy.deepcopy(files)
        holder = changed[name]
        for key in path[:-1]:
            holder = holder[key]
        holder[path[-1]] = _changed(holder[path[-1]], next(k for k in reversed(path) if isinstance(k, str)))
        if not problems(name, changed):
            missed.append(path)
    assert missed == [] and len(leaves) > 20


@pytest.mark.parametrize("codec", vectors.UPDATE_CODECS)
def test_the_coordinators_assembler_completes_every_update(codec):
    d = stored()[f"update-{codec}.json"]
    asm = ShardAssembler(RoundLayout(d["round_id"], d["base_version"], d["num_params"], d["shard_values"], codec,
                                     hx(d["base_digest_hex"])), federation=d["federation"])
    kinds = [asm.add(decode(hx(e["payload_hex"]), UpdateShard)).kind for e in d["shards"]]
    assert kinds == ["accepted"] * (len(d["shards"]) - 1) + ["complete"]
    assert asm.accepted_update(d["device"]) == d["update_id"]


@pytest.mark.parametrize("scheme", ["hmac-sha256", "ed25519"])
def test_the_assembler_verifies_the_signed_updates_and_refuses_another_key(scheme):
    d = stored()["signing.json"]
    s = d[scheme]
    right = (HmacVerifier({d["device"]: hx(s["key_hex"])}) if scheme == "hmac-sha256"
             else Ed25519Verifier({d["device"]: hx(s["public_key_hex"])}))
    wrong = (HmacVerifier({d["device"]: bytes(32)}) if scheme == "hmac-sha256"
             else Ed25519Verifier({d["device"]: Ed25519PrivateKey.from_private_bytes(bytes(32)).public_key()
                                   .public_bytes_raw()}))
    outcomes = {}
    for label, verifier in (("right", right), ("wrong", wrong)):
        asm = ShardAssembler(RoundLayout(d["round_id"], 4, 20, 8, "raw", hx(d["base_digest_hex"])), verifier=verifier,
                             federation=d["federation"])
        outcomes[label] = [(o.kind, o.reason) for o in (asm.add(decode(hx(e["payload_hex"]), UpdateShard))
                                                          for e in s["shards"])][-1]
    assert outcomes == {"right": ("complete", ""), "wrong": ("rejected", "signature")}


@pytest.mark.parametrize("name, base", [("model.json", -1), ("model-delta.json", 3)])
def test_the_coordinators_model_store_publishes_these_very_payloads(name, base):
    d = stored()[name]
    vector = f32(d["vector_f32le_hex"] if base < 0 else d["delta_f32le_hex"])
    published = model_shards(TOPICS, d["version"], vector, d["shard_values"], d["codec"], base=base)
    assert [(p.topic, p.payload.hex(), p.retain) for p in published] == [
        (e["topic"], e["payload_hex"], True) for e in d["shards"]]


def test_the_command_line_writes_and_checks(tmp_path, capsys):
    assert vectors.main(["--out", str(tmp_path / "v")]) == 0
    assert vectors.main(["--check", str(tmp_path / "v")]) == 0
    (tmp_path / "v" / "status.json").write_text("{}")
    assert vectors.main(["--check", str(tmp_path / "v")]) == 1
    assert capsys.readouterr().err == f"{tmp_path}/v/status.json: differs from a fresh build\n"
    (tmp_path / "file").write_text("")
    assert vectors.main(["--out", str(tmp_path / "file")]) == 1
    assert capsys.readouterr().err.startswith(f"--out {tmp_path}/file: cannot write: ")


def test_security_md_states_the_domain_separation_tag():
    security = (VECTORS.parent / "security.md").read_text(encoding="utf-8")
    assert SIGNING_DOMAIN == DOMAIN and f"hex `{DOMAIN.hex()}`" in security
