"""Each synchronisation mode's rules live in one place (coordinator/policy.py, MODES).

The rules are asserted value by value for every mode, and the coordinator's modules are
read (``ast``) to show that none of them compares a mode name: a new branch on
``policy.mode`` outside policy.py fails here, with a positive control that one is caught.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

from fedsync.coordinator.policy import MODES, ModeRules, RoundPolicy
from fedsync.coordinator.round_state import RoundEvent

COORDINATOR = pathlib.Path(__file__).resolve().parents[1] / "coordinator"


def test_every_mode_and_only_these_have_rules():
    assert list(MODES) == ["sync", "async", "semisync"]
    assert [RoundPolicy(mode=m).rules for m in MODES] == list(MODES.values())
    with pytest.raises(ValueError, match=r"round.mode: 'fedbuff' is not one of sync, async, semisync"):
        RoundPolicy(mode="fedbuff")


def test_who_trains():
    # 8 online, target 4, over-selection 50 %: sync picks ceil(4 * 1.5) = 6, the others everyone.
    assert {m: r.selection_size(8, 4, 0.5) for m, r in MODES.items()} == {"sync": 6, "async": 8, "semisync": 8}
    assert MODES["sync"].selection_size(3, 4, 0.5) == 3  # never more than are online


@pytest.mark.parametrize("mode,accepted,buffered,live_pending,event", [
    ("sync", 4, 0, True, RoundEvent.TARGET),  # target reached: at once, even with devices pending
    ("sync", 2, 0, False, RoundEvent.NO_LIVE_PENDING),  # quorum in, nobody alive left to wait for
    ("sync", 2, 0, True, None),
    ("sync", 1, 0, False, None),  # below quorum: wait for the deadline
    ("semisync", 4, 0, True, None),  # the period decides, not the target
    ("semisync", 2, 0, False, RoundEvent.NO_LIVE_PENDING),
    ("async", 0, 4, True, RoundEvent.BUFFER_FULL),
    ("async", 9, 3, False, None),  # the buffer, not this round's accepted count or presence
])
def test_when_a_round_closes_early(mode, accepted, buffered, live_pending, event):
    asked = []

    def pending() -> bool:
        asked.append(1)
        return live_pending

    assert MODES[mode].early_close(accepted, buffered, target=4, quorum=2, live_pending=pending) is event
    assert len(asked) <= 1


def test_whether_it_commits_and_how_much_an_update_weighs():
    assert [(m, r.commits(0, 1, 2), r.commits(2, 0, 2)) for m, r in MODES.items()] == [
        ("sync", False, True), ("async", True, False), ("semisync", False, True)]
    # An update 3 versions old at exponent 0.5 weighs 1/2 of its samples in async; the others do not
    # take old updates at all, so they weigh by samples.
    assert [r.weight(10, 3, 0.5) for r in MODES.values()] == [10, 5.0, 10]


def _mode_comparisons(source: str) -> list[int]:
    """Lines comparing something's ``.mode`` (or a bare ``mode``) with anything."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                if (isinstance(side, ast.Attribute) and side.attr == "mode") or \
                        (isinstance(side, ast.Name) and side.id == "mode"):
                    lines.append(node.lineno)
    return lines


def test_no_coordinator_module_branches_on_a_mode_name():
    found = {p.name: _mode_comparisons(p.read_text())
             for p in sorted(COORDINATOR.glob("*.py")) if p.name != "policy.py"}
    assert {name: lines for name, lines in found.items() if lines} == {}
    # positive control: the branch the core used to have is caught
    assert _mode_comparisons('if self.policy.mode == "async":\n    pass\n') == [1]
    assert isinstance(MODES["async"], ModeRules)
