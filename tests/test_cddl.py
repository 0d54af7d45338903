"""docs/protocol.cddl against the code, in both directions.

* Every payload the code encodes validates against the CDDL: every publish of a simulated
  federation (manifests open and finished, model and delta shards, updates, receipts,
  statuses), hand-made payloads at the limits, and every fuzz-corpus payload
  (tests/test_fuzz.py's generator) that the decoder accepts.
* Payloads the CDDL rejects (wrong type, null for an optional key, a float for an integer,
  tagged byte strings, out of range, bad ids, too long) are rejected by the decoder too,
  with the exact field and reason.
* The CDDL, fedsync.messages and the tables of docs/protocol.md list the same fields.

The validator is pycddl 0.6.4 (cddl-rs 0.9.5 inside). It departs from RFC 8610 in ways
measured here, so it is given a dialect of the file: ``DIALECT`` lists each rewrite, why,
and how often it must apply. Where a rewrite gives up a rule (text size of map keys), or
where cddl-rs is more lenient than RFC 8610 (CBOR bignums as ``int``), the rule is tested
on the decoder directly (``DECODER_ONLY``). cddl-rs panics (``PanicException``) on some
type confusions (a byte string where a text literal is expected): a panic counts as "not
valid", never as valid.
"""

from __future__ import annotations

import random
import re
from dataclasses import MISSING, fields
from pathlib import Path

import cbor2
import numpy as np
import pycddl
import pytest

from fedsync.actions import Publish
from fedsync.coordinator.core import RoundPolicy
from fedsync.errors import ProtocolError
from fedsync.messages import (MAX_PAYLOAD, ModelShard, PeerStatus, RoundManifest, ShardAck, UpdateShard, decode,
                              encode)
from tests.sim import Sim, offset_trainer
from tests.test_fuzz import CASES, SEED, Mutator, genuine_update, open_round
from tests.wire_cases import (ACCEPTED_BY_BOTH, BUILDERS, CROSS_FIELD, DECODER_ONLY, LARGE_DATA,
                              REJECTED, manifest, mutated, peer_status, shard_ack, update_shard)

ROOT = Path(__file__).resolve().parents[1]
CDDL_TEXT = (ROOT / "docs" / "protocol.cddl").read_text(encoding="utf-8")
PROTOCOL_MD = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
MESSAGES = {"round-manifest": RoundManifest, "model-shard": ModelShard, "update-shard": UpdateShard,
            "shard-ack": ShardAck, "peer-status": PeerStatus}
_FLOAT = r"-?\d+\.\d+(?:e\d+)?"

# (pattern, replacement, times it must apply, why). Applied in order with re.subn (MULTILINE).
DIALECT = [
    # cddl-rs applies no control operator to a map key (it checks the whole map against
    # `.size (0..32)` and rejects every map): keys are checked as plain text, and their
    # size on the decoder (DECODER_ONLY).
    (r"^number-key = tstr \.size \(0\.\.32\)$", "number-key = tstr", 1, "no controls on map keys"),
    # cddl-rs rejects every value against a float range `a..b`; `.within` of two bounds
    # means the same thing (both must hold, and the left is a subset of the right).
    (rf"\(({_FLOAT})\.\.({_FLOAT})\)", r"((float .ge \1) .within (float .le \2))", 3, "float ranges"),
    # cddl-rs matches a byte string against an integer range (`0..10` takes h'ff'); `.within
    # int` restores the major type. Integer ranges only, not the `.size` arguments.
    (r"(?<!\.size \()(?<![\d.])(\d+)\.\.(\d+)(?![\d.])", r"((\1..\2) .within int)", 15, "ranges take bytes"),
    # cddl-rs's `.size` matches a value of either string type (text for `bytes .size 16`);
    # `.within` restores the major type. Not inside an array (the parameter name): there
    # cddl-rs reads `(a) .within b` as more array items, so that check is DECODER_ONLY.
    (r"(?<!name: )\b(bytes|tstr) \.size (\d+|\(\d+\.\.\d+\))", r"((\1 .size \2) .within \1)", 6,
     ".size ignores the type"),
    # RFC 8610 §3.8.3: `.regexp` is an XSD regexp, which matches the whole text; cddl-rs
    # uses Rust's regex crate, which finds a match anywhere ("dev/1" contains "dev").
    (r'\.regexp "([^"]*)"', r'.regexp "^(?:\1)$"', 1, "XSD regexps are anchored"),
    # cddl-rs panics comparing a text literal with a byte string: say "text" first.
    (r'^([a-z-]+) = ("[a-z]+"(?: / "[a-z]+")+)$', r"\1 = (\2) .within tstr", 4, "text literals vs bytes"),
    (r'"t": ("[a-z]+"),', r'"t": (\1) .within tstr,', 5, "text literals vs bytes"),
]


def pycddl_dialect(text: str) -> str:
    for pattern, replacement, times, why in DIALECT:
        text, n = re.subn(pattern, replacement, text, flags=re.MULTILINE)
        assert n == times, f"dialect rewrite ({why}) applied {n} times, expected {times}: {pattern}"
    return text


DIALECT_TEXT = pycddl_dialect(CDDL_TEXT)
# cddl-rs validates a type choice of maps wrongly: `m = {"x": int} / {"y": int}` accepts
# `[1]` and `{"x": [1]}` (test_pycddl_accepts_arrays_against_a_choice_of_maps). So the
# choice `fedsync-message` is evaluated here, one schema per kind: valid if any kind matches.
KIND_SCHEMAS = {rule: pycddl.Schema(f"root = {rule}\n{DIALECT_TEXT}") for rule in MESSAGES}


def _one(schema: pycddl.Schema, payload: bytes) -> str:
    try:
        schema.validate_cbor(payload)
    except pycddl.ValidationError:
        return "invalid"
    except BaseException as exc:  # noqa: BLE001 - pyo3's PanicException derives from BaseException
        if type(exc).__name__ != "PanicException":
            raise
        return "panic"
    return "valid"


def verdict(payload: bytes) -> str:
    """``valid`` (some message kind matches), ``invalid``, or ``panic`` (cddl-rs crashed on
    every kind that did not reject it: not a validation)."""
    results = {_one(schema, payload) for schema in KIND_SCHEMAS.values()}
    return "valid" if "valid" in results else "panic" if "panic" in results else "invalid"


def decoder_error(payload: bytes) -> tuple[str, str] | None:
    try:
        decode(payload)
    except ProtocolError as err:
        return (err.field, err.reason)
    return None


# -- 1. what the code encodes is valid ------------------------------------------------------

def federation_publishes() -> list[Publish]:
    """Every publish of a three-device, three-round federation run by the real cores."""
    seen: list[Publish] = []
    # A random model and constant deltas: the deltas compress below the model, so they are published.
    params = {"w": np.random.default_rng(7).normal(size=(8, 8)).astype(np.float32), "b": np.ones(8, np.float32)}
    devices = ["dev-0", "dev-1", "dev-2"]
    sim = Sim(devices, RoundPolicy(rounds=3, target=3, quorum=2, min_devices=3, shard_values=32), params=params,
              trainers={d: offset_trainer(0.25 * (i + 1), 10 * (i + 1)) for i, d in enumerate(devices)})

    def record(sender, p: Publish) -> list[Publish]:
        seen.append(p)
        return [p]

    sim.on_publish = record
    sim.start()
    sim.settle()
    assert [c.outcome for c in sim.closed()] == ["committed"] * 3
    return [p for p in seen if p.payload]  # empty retained payloads clear a topic: not messages


def test_every_publish_of_a_federation_is_valid_cddl():
    decoded = []
    for p in federation_publishes():
        assert verdict(p.payload) == "valid", (p.topic, decode(p.payload))
        decoded.append(decode(p.payload))
    kinds = {type(m).__name__ for m in decoded}
    assert kinds == {"RoundManifest", "ModelShard", "UpdateShard", "ShardAck", "PeerStatus"}
    assert {m.state for m in decoded if isinstance(m, RoundManifest)} == {"open", "waiting", "finished"}
    assert {m.base >= 0 for m in decoded if isinstance(m, ModelShard)} == {True, False}  # deltas published
    assert {m.status for m in decoded if isinstance(m, ShardAck)} == {"partial", "accepted"}
    assert any(isinstance(m, PeerStatus) and m.peer == "coordinator" for m in decoded)


def test_every_conformance_vector_is_valid_cddl():
    payloads = re.findall(r'"payload_hex": "([0-9a-f]+)"', "".join(
        p.read_text(encoding="ascii") for p in sorted((ROOT / "docs" / "vectors").glob("*.json"))))
    assert len(payloads) == 43  # every UpdateShard, ModelShard, manifest, receipt and status in docs/vectors
    assert [verdict(bytes.fromhex(p)) for p in payloads] == ["valid"] * 43


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_realistic_messages_of_every_kind_are_valid(kind):
    payload = encode(BUILDERS[kind]())
    assert verdict(payload) == "valid"


@pytest.mark.parametrize("state", ["open", "waiting", "finished"])
def test_manifest_states_are_valid(state):
    assert verdict(encode(manifest(state=state))) == "valid"


@pytest.mark.parametrize("status", ["partial", "accepted", "duplicate", "rejected", "closed", "refused"])
def test_every_receipt_status_is_valid(status):
    assert verdict(encode(shard_ack(status=status, reason="" if status == "partial" else "layout"))) == "valid"


@pytest.mark.parametrize("name", sorted(ACCEPTED_BY_BOTH))
def test_payloads_at_the_limits_are_accepted_by_both(name):
    payload = ACCEPTED_BY_BOTH[name]
    assert decoder_error(payload) is None
    assert verdict(payload) == "valid"


def test_a_float16_encoded_time_is_accepted_by_both():
    # 100.0 as a half float (f9 5640) instead of cbor2's float64 (fb 4059000000000000).
    raw = mutated("manifest", deadline=100.0, issued_at=40.0)
    half = raw.replace(bytes.fromhex("fb4059000000000000"), bytes.fromhex("f95640"))
    assert half != raw and decode(half).deadline == 100.0
    assert verdict(half) == "valid"


def test_fuzz_payloads_the_decoder_accepts_are_valid_cddl():
    """The fuzz generator of tests/test_fuzz.py, same seed and count: whatever the decoder
    accepts, the CDDL accepts. (The converse is the explicit table below: pycddl is too
    lenient in places, see DECODER_ONLY, to judge random mutants on its own.)"""
    _, m = open_round()
    corpus = (genuine_update(m, "dev-1", "u-dev1", np.linspace(-1, 1, m.num_params, dtype=np.float32))[:-1]
              + genuine_update(m, "dev-2", "u-dev2", np.full(m.num_params, 0.25, np.float32))[:-1])
    fuzz = Mutator(random.Random(SEED), m, corpus)
    accepted = rejected_by_both = 0
    for i in range(CASES):
        case = fuzz.case()
        if len(case.payload) > MAX_PAYLOAD:
            continue  # refused before parsing (test_payload_rules_cddl_cannot_state)
        v = verdict(case.payload)
        if decoder_error(case.payload) is None:
            accepted += 1
            assert v == "valid", (i, case.kind, decode(case.payload))
        elif v != "valid":
            rejected_by_both += 1
    # Both branches exercised: genuine shards and harmless mutants; and a validator that
    # rejects, not one that takes everything.
    assert accepted > 100 and rejected_by_both > 5000, (accepted, rejected_by_both)


# -- 2. what the CDDL rejects, the decoder rejects ---------------------------------------------


@pytest.mark.parametrize("case, kind, changes, expected", REJECTED, ids=[c[0] for c in REJECTED])
def test_payloads_the_cddl_rejects_are_rejected_by_the_decoder(case, kind, changes, expected):
    payload = mutated(kind, **changes)
    assert verdict(payload) in ("invalid", "panic")
    assert decoder_error(payload) == expected


UPDATE_CASES = [c for c in REJECTED if c[1] == "update" and "data" not in c[2]] + [
    ("tag 64 (Uint8Array) bytes, large", "update", {"data": cbor2.CBORTag(64, LARGE_DATA)}, ("data", "type"))]


@pytest.mark.parametrize("case, kind, changes, expected", UPDATE_CASES, ids=[c[0] for c in UPDATE_CASES])
def test_the_in_place_reader_rejects_the_same_update_payloads(case, kind, changes, expected):
    # An 8000-byte data field sends the payload through fedsync.cborview instead of cbor2.
    payload = mutated(kind, large=True, **changes)
    assert len(payload) > 8000
    assert verdict(payload) in ("invalid", "panic")
    assert decoder_error(payload) == expected


@pytest.mark.parametrize("case, kind, changes, expected", DECODER_ONLY, ids=[c[0] for c in DECODER_ONLY])
def test_rules_pycddl_misses_are_enforced_by_the_decoder(case, kind, changes, expected):
    payload = mutated(kind, **changes)
    assert verdict(payload) == "valid"  # pycddl's gap (see the list's comments)
    assert decoder_error(payload) == expected


def with_duplicate(payload: bytes, key: str, value) -> bytes:
    """``payload`` (a map of fewer than 24 keys) with ``key`` written a second time, last."""
    assert 0xA0 <= payload[0] < 0xB7
    return bytes([payload[0] + 1]) + payload[1:] + cbor2.dumps(key) + cbor2.dumps(value)


@pytest.mark.parametrize("payload", [encode(peer_status()), encode(update_shard(LARGE_DATA))],
                         ids=["status (cbor2)", "large update (in-place reader)"])
def test_a_map_with_a_duplicate_key(payload):
    key = "peer" if len(payload) < 1000 else "device"
    dup = with_duplicate(payload, key, "dev-9")
    assert cbor2.loads(dup)[key] == "dev-9"  # well-formed, and cbor2 keeps the last
    assert decoder_error(payload) is None
    assert decoder_error(dup) == (key, "duplicate_key")


def test_a_duplicate_key_inside_a_field_and_in_indefinite_form():
    body = cbor2.loads(encode(update_shard()))
    metrics = b"\xa2" + cbor2.dumps("x") + cbor2.dumps(1.0) + cbor2.dumps("x") + cbor2.dumps(2.0)
    raw = cbor2.dumps({k: v for k, v in body.items() if k != "metrics"})
    nested = bytes([raw[0] + 1]) + raw[1:] + cbor2.dumps("metrics") + metrics
    assert cbor2.loads(nested)["metrics"] == {"x": 2.0}
    assert decoder_error(nested) == ("metrics[x]", "duplicate_key")
    # the same key as definite text and as indefinite-length chunks ("pe" "er") is one key
    status = encode(peer_status())
    chunked = bytes([status[0] + 1]) + status[1:] + b"\x7f\x62pe\x62er\xff" + cbor2.dumps("dev-9")
    assert cbor2.loads(chunked)["peer"] == "dev-9"
    assert decoder_error(chunked) == ("peer", "duplicate_key")


@pytest.mark.parametrize("payload, expected", [
    (b"\xa0" * (MAX_PAYLOAD + 1), ("payload", "size")),  # 32 MiB + 1: refused before parsing
    (encode(peer_status()) + b"\x00", ("payload", "trailing_bytes")),
    (b"", ("payload", "empty")),
    (cbor2.dumps([1, "status"]), ("payload", "type")),
    (cbor2.dumps(cbor2.CBORTag(55799, cbor2.loads(encode(peer_status())))), ("payload", "type")),
])
def test_payload_rules_cddl_cannot_state(payload, expected):
    assert decoder_error(payload) == expected


@pytest.mark.parametrize("case, kind, changes, expected", CROSS_FIELD, ids=[c[0] for c in CROSS_FIELD])
def test_cross_field_rules_are_comments_in_the_cddl_and_checked_by_the_decoder(case, kind, changes, expected):
    payload = mutated(kind, **changes)
    assert verdict(payload) == "valid"
    assert decoder_error(payload) == expected


# -- 3. one list of fields ------------------------------------------------------------------

def cddl_rules(text: str) -> dict[str, str]:
    """Rule name -> body, for the multi-line map ``{...}`` and group ``(...)`` rules."""
    return {m[1]: m[2] for m in re.finditer(r"^([a-z-]+) = [{(]\n(.*?)^[})]$", text, re.MULTILINE | re.DOTALL)}


def cddl_keys(rules: dict[str, str], name: str) -> dict[str, bool]:
    """Key -> optional, with group references expanded."""
    keys: dict[str, bool] = {}
    for line in rules[name].splitlines():
        line = line.split(";")[0].strip()
        if m := re.fullmatch(r'(\? )?"(\w+)": .*,', line):
            keys[m[2]] = bool(m[1])
        elif m := re.fullmatch(r"([a-z-]+),", line):
            keys.update(cddl_keys(rules, m[1]))
    return keys


def test_the_first_rule_is_the_choice_of_every_message_kind():
    first = next(line for line in CDDL_TEXT.splitlines() if line and not line.startswith(";"))
    assert first == "fedsync-message = " + " / ".join(MESSAGES)
    rules = cddl_rules(CDDL_TEXT)
    for rule, cls in MESSAGES.items():
        assert f'"t": "{cls.KIND}",' in rules[rule]


@pytest.mark.parametrize("rule", sorted(MESSAGES))
def test_cddl_and_messages_list_the_same_fields_with_the_same_optional_ones(rule):
    cls = MESSAGES[rule]
    in_code = {f.name: f.default is not MISSING or f.default_factory is not MISSING for f in fields(cls)}
    assert cddl_keys(cddl_rules(CDDL_TEXT), rule) == {"v": False, "t": False, **in_code}


def test_the_field_parser_reads_the_cddl():  # positive control for the test above
    keys = cddl_keys(cddl_rules(CDDL_TEXT), "update-shard")
    assert len(keys) == 18 and keys["signature"] and not keys["data"]


@pytest.mark.parametrize("rule", sorted(MESSAGES))
def test_protocol_md_names_every_field_and_only_rules_the_cddl_defines(rule):
    cls = MESSAGES[rule]
    section = PROTOCOL_MD.split(f"### {cls.__name__} (`t = \"{cls.KIND}\"`)")[1].split("\n#")[0]
    rows = [line.split("|")[1:3] for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    named = {name.strip() for first, _ in rows[1:] for name in first.split(",")}
    assert {f.name for f in fields(cls)} <= named
    defined = set(re.findall(r"^([a-z-]+) = ", CDDL_TEXT, re.MULTILINE))
    used = {word for _, schema in rows[1:] for span in re.findall(r"`([^`]*)`", schema)
            for word in re.findall(r"[a-z]+(?:-[a-z]+)+|\b(?:id|digest|version|offset|incarnation)\b", span)}
    assert used and used <= defined, used - defined


def test_the_unmodified_cddl_parses():
    # The shipped file, before the dialect: a second reading of its syntax by cddl-rs.
    assert "Schema" in repr(pycddl.Schema(CDDL_TEXT))


def test_without_the_dialect_pycddl_rejects_a_valid_manifest():
    # float ranges and map-key sizes: the reason for the first two rewrites
    raw = pycddl.Schema("root = round-manifest\n" + CDDL_TEXT)
    with pytest.raises(pycddl.ValidationError):
        raw.validate_cbor(encode(manifest()))
    assert verdict(encode(manifest())) == "valid"


def test_pycddl_accepts_arrays_against_a_choice_of_maps():
    # Why verdict() evaluates the top-level choice itself: the whole-file schema, whose first
    # rule is the choice, takes a bare array and an update whose device is an array.
    whole = pycddl.Schema(DIALECT_TEXT)
    for payload in (cbor2.dumps([1, 2]), mutated("update", device=[1, 2])):
        whole.validate_cbor(payload)  # no error: cddl-rs's bug
        assert verdict(payload) == "invalid"
