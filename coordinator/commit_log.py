"""The coordinator's commit log: what every round was opened on and what it closed with.

Theory of operation
-------------------
``checkpoint.cbor`` holds only the newest committed model; an auditor that rebuilds
*every* committed model from the devices' own ledgers (:mod:`fedsync.lab.audit`) needs
each one, and the update ids that went into it. The :class:`~fedsync.coordinator.journal.Journal`
therefore also appends to ``{state_dir}/commits.log``, never rewriting it. Records are
framed as in the round logs (``u32 length`` + CBOR) and are CBOR maps with a kind ``k``:

``open``      written when a round log is created (not again when a restarted coordinator
              resumes the round): ``round``, ``incarnation``, ``mode``, ``version`` and
              ``digest`` of the model the round trains from, ``codec``, ``selected``.
``close``     written with every checkpoint, *before* the checkpoint replaces the old one:
              ``round`` (the round that just closed), ``version`` and ``digest`` of the
              model after it, ``updates`` ({device: update id} the coordinator counted in
              that round, from the checkpoint's ``recent``), ``state_keys`` (names of the
              strategy's state), and ``vector`` (the model, raw float32 little-endian) when
              the version differs from the last close record this process wrote.
``strategy``  ``name`` and scalar ``options`` of the aggregation strategy, written by
              whoever builds the coordinator (:meth:`Journal.note_strategy`); the last wins.

Reading (:func:`read_commit_log`): a close record whose version is above every earlier one
(and above 0) is a commit; one with the version of an earlier commit *of the same round* replaces it (a
crash after the close record and before the checkpoint: the restarted coordinator replays
the round and commits it again); any other is an abandoned round. A torn tail (a crash
mid-append) is ignored, as in the round logs.

Cost: one model's worth of bytes (plus a few hundred) appended and fsync'd per committed
round, next to the checkpoint, which is rewritten whole at the same moment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedsync.messages import RoundManifest
from fedsync.params import vector_digest
from fedsync.records import frame, read_records

FILE_NAME = "commits.log"


@dataclass(frozen=True, slots=True)
class OpenRecord:
    round_id: int
    incarnation: int
    mode: str
    version: int
    digest: bytes
    codec: str
    selected: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class CloseRecord:
    round_id: int
    version: int
    digest: bytes
    updates: dict[str, str]  # device -> update id counted in this round
    state_keys: tuple[str, ...]
    vector: np.ndarray | None  # the model after the round; None if this record carries none


@dataclass(slots=True)
class CommitLog:
    """What ``commits.log`` says, resolved (see the module docstring)."""

    opens: dict[int, OpenRecord] = field(default_factory=dict)  # round id -> its first open record
    commits: list[CloseRecord] = field(default_factory=list)  # in version order
    abandoned: list[int] = field(default_factory=list)  # round ids
    strategy: tuple[str, dict] | None = None
    initial: np.ndarray | None = None  # version 0, if a close record of an abandoned first round carried it
    torn_tail: bool = False


def append_open(state_dir: Path, manifest: RoundManifest) -> None:
    _append(state_dir, {"k": "open", "round": manifest.round_id, "incarnation": manifest.incarnation,
                        "mode": manifest.mode, "version": manifest.model_version, "digest": manifest.model_digest,
                        "codec": manifest.update_codec, "selected": list(manifest.selected)})


def append_close(state_dir: Path, round_id: int, version: int, vector: np.ndarray, updates: dict[str, str],
                 state_keys, with_vector: bool) -> None:
    vec = np.ascontiguousarray(vector, "<f4")
    body = {"k": "close", "round": round_id, "version": version, "digest": vector_digest(vec),
            "updates": dict(updates), "state_keys": sorted(state_keys)}
    if with_vector:
        body["vector"] = vec.tobytes()
    _append(state_dir, body)


def append_strategy(state_dir: Path, name: str, options: dict) -> None:
    scalars = {k: v for k, v in options.items() if isinstance(v, (bool, int, float, str))}
    _append(state_dir, {"k": "strategy", "name": name, "options": scalars})


def _append(state_dir: Path, body: dict) -> None:
    with open(Path(state_dir) / FILE_NAME, "ab") as fh:
        fh.write(frame(body))
        fh.flush()
        os.fsync(fh.fileno())


def read_commit_log(state_dir: str | os.PathLike[str]) -> CommitLog:
    """Read and resolve ``{state_dir}/commits.log``; ``FileNotFoundError`` if there is none."""
    data = (Path(state_dir) / FILE_NAME).read_bytes()
    log = CommitLog()
    by_version: dict[int, CloseRecord] = {}
    top = -1
    bodies, log.torn_tail = read_records(data)
    for body in bodies:
        kind = body.get("k")
        if kind == "open":
            log.opens.setdefault(body["round"], OpenRecord(body["round"], body["incarnation"], body["mode"],
                                                           body["version"], body["digest"], body["codec"],
                                                           tuple(body["selected"])))
        elif kind == "strategy":
            log.strategy = (body["name"], dict(body["options"]))
        elif kind == "close":
            raw = body.get("vector")
            rec = CloseRecord(body["round"], body["version"], body["digest"], dict(body["updates"]),
                              tuple(body["state_keys"]),
                              None if raw is None else np.frombuffer(raw, "<f4").astype(np.float32))
            earlier = by_version.get(rec.version)
            if rec.version == 0:  # nothing committed yet: an abandoned round on the initial model
                log.abandoned.append(rec.round_id)
                log.initial = rec.vector if rec.vector is not None else log.initial
            elif rec.version > top:
                by_version[rec.version] = rec
                top = rec.version
            elif earlier is not None and earlier.round_id == rec.round_id:
                by_version[rec.version] = rec  # the same round committed again after a crash
            else:
                log.abandoned.append(rec.round_id)
    log.commits = [by_version[v] for v in sorted(by_version)]
    return log
