"""The device's persistent outbox: a finished update survives a crash or a reboot.

One file per device, ``{state_dir}/outbox.cbor``, holding the last finished
update exactly as it goes on the wire (topics and encoded shard payloads).
It is written atomically (:func:`fedsync.atomic.write_atomic`: temporary file,
fsync, rename, fsync of the directory) before the first shard is published, and
removed once the coordinator's receipt says the update needs no more sending. After a restart
the agent loads it and, if the round is still open, re-sends only what the
coordinator's retained receipt says it lacks.
"""

from __future__ import annotations

import os
from pathlib import Path

import cbor2

from fedsync.atomic import write_atomic
from fedsync.device_agent.agent import OutboxRecord


class Outbox:
    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "outbox.cbor"
        self._round: int | None = None  # round of the record on disk, once saved or loaded

    def save(self, record: OutboxRecord) -> None:
        self._round = record.round_id
        body = {"round_id": record.round_id, "update_id": record.update_id, "qos": record.qos,
                "topics": list(record.topics), "payloads": list(record.payloads), "retries": record.retries}
        write_atomic(self.path, cbor2.dumps(body))

    def load(self) -> OutboxRecord | None:
        """The persisted update, or None. A corrupt file is set aside, not trusted."""
        if not self.path.exists():
            return None
        try:
            b = cbor2.loads(self.path.read_bytes())
            rec = OutboxRecord(int(b["round_id"]), str(b["update_id"]), int(b["qos"]), tuple(b["topics"]),
                               tuple(bytes(p) for p in b["payloads"]), int(b.get("retries", 0)))
            if not rec.payloads or len(rec.payloads) != len(rec.topics):
                raise ValueError("topics and payloads differ in length")
            self._round = rec.round_id
            return rec
        except Exception:  # noqa: BLE001 - any damage: keep the evidence, start clean
            self.path.replace(self.path.with_suffix(".corrupt"))
            return None

    def clear(self, round_id: int) -> None:
        """Delete the record of ``round_id``; a newer round's record stays (a late receipt
        for an old round must not throw away the update in flight)."""
        if self._round is not None and self._round != round_id:
            return
        self.path.unlink(missing_ok=True)
        self._round = None
