"""The device outbox: atomic, and a receipt for an old round never deletes a newer update."""

from __future__ import annotations

from fedsync.device_agent.agent import OutboxRecord
from fedsync.device_agent.outbox import Outbox


def _record(round_id: int) -> OutboxRecord:
    return OutboxRecord(round_id, f"u{round_id}", 1, (f"t/{round_id}/0",), (b"payload-%d" % round_id,))


def test_clear_of_another_round_keeps_the_saved_update(tmp_path):
    box = Outbox(tmp_path)
    box.save(_record(7))
    box.clear(6)  # a late receipt of round 6
    assert Outbox(tmp_path).load() == _record(7)
    box.clear(7)
    assert Outbox(tmp_path).load() is None


def test_a_loaded_record_is_cleared_only_by_its_own_round(tmp_path):
    Outbox(tmp_path).save(_record(3))
    box = Outbox(tmp_path)  # after a restart
    assert box.load() == _record(3)
    box.clear(2)
    assert box.path.exists()
    box.clear(3)
    assert not box.path.exists()


def test_a_corrupt_file_is_set_aside(tmp_path):
    box = Outbox(tmp_path)
    box.path.write_bytes(b"\xff not cbor")
    assert box.load() is None
    assert box.path.with_suffix(".corrupt").read_bytes() == b"\xff not cbor"
