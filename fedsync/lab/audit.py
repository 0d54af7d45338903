"""An audit of the coordinator from outside: every committed model rebuilt from the devices' ledgers.

Theory of operation
-------------------
Two records that do not depend on each other:

* each device's ledger (:mod:`fedsync.device_agent.ledger`): the updates it sent, with the
  exact float32 delta the coordinator decodes, and the receipts it got back;
* the coordinator's state dir (:mod:`fedsync.coordinator.commit_log`): for every round, the
  model it was opened on and, when it closed, the model it committed and the update ids
  the coordinator says it counted.

:func:`audit` walks the committed versions in order. Version ``v`` is rebuilt from the
committed version ``v - 1`` (version 0: the initial model, which devices record from
what they trained on, checked against the manifest's digest) and the ledger deltas of the
update ids the commit names, with the round's strategy; since every earlier version was
itself rebuilt, this is the chain from the initial model. The rebuild must equal the
committed model to float tolerance (``|a - b| <= atol + rtol * |b|`` per value; replay adds
the updates in another order than the coordinator did, so the last bit may differ). When
it does not, the auditor explains the difference if it can: one counted update folded in
twice (``double_counted``), one the coordinator names but the model lacks (``missing``), one
in the model that the coordinator does not name; otherwise it names the device whose delta
best lines up with the difference. Either way the first such round and device are
``first_mismatch``.

Then the devices' side: an update whose device holds an ``accepted`` receipt must be in a
committed round (else ``missing``, or ``pending`` while its round is still open in the state
dir); an update counted in another round than its own is ``double_counted`` if its own
round counted it too; a counted update no device ledger holds is ``unledgered``; a model
digest a device trained on must be the committed model of that version (``digest_mismatches``).

Updates are identified by (device, round, update id): an agent restarted without its memory
draws the same update ids again (its generator is seeded by the device id), so an id alone
may repeat across rounds.

Which ledger entries belong to this state dir: a ledger may span campaigns (a standing
fleet), so an entry counts if the state dir names its update id, or it trained on a manifest
of one of the coordinator incarnations that opened a round here, or it is in the same
campaign segment of its ledger as such an entry and trained on the model this state dir
opened its round on.

Strategies replayed: fedavg, mean, fedavgm, fedadam (their state replayed round by round),
median, trimmed_mean, krum, multi_krum. Not: dp_fedavg (its noise is the coordinator's
secret) and async mode (an update may be folded into a later round than its own; the state
dir does not record which). Both are refused as bad input.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedsync.coordinator import model_store
from fedsync.coordinator.aggregate import factory_state, load_factory_state
from fedsync.coordinator.commit_log import CloseRecord, CommitLog, read_commit_log
from fedsync.coordinator.strategies import make_strategy_factory
from fedsync.device_agent.ledger import SUFFIX, DeviceRecords, UpdateEntry, read_ledger_dir
from fedsync.params import vector_digest

SUPPORTED = ("fedavg", "mean", "fedavgm", "fedadam", "median", "trimmed_mean", "krum", "multi_krum")
RTOL, ATOL = 1e-5, 1e-7


class AuditError(ValueError):
    """The audit's input is unusable (names the directory or setting and why)."""


@dataclass(frozen=True, slots=True)
class Finding:
    """One update the audit has something to say about."""

    round_id: int
    device: str | None
    update_id: str | None
    why: str

    def to_dict(self) -> dict:
        return {"round": self.round_id, "device": self.device, "update_id": self.update_id, "why": self.why}


@dataclass(slots=True)
class AuditReport:
    strategy: str
    rounds_committed: int = 0  # commits the state dir records
    rounds_verified: int = 0  # of those, rebuilt from the ledgers to tolerance
    missing: list[Finding] = field(default_factory=list)
    double_counted: list[Finding] = field(default_factory=list)
    unledgered: list[Finding] = field(default_factory=list)
    mismatches: list[dict] = field(default_factory=list)  # {round, version, device, max_abs_diff, explained}
    digest_mismatches: list[Finding] = field(default_factory=list)
    unverifiable: list[Finding] = field(default_factory=list)
    pending: list[Finding] = field(default_factory=list)  # accepted in a round the state dir has not closed
    first_mismatch: tuple[int, str | None] | None = None
    max_abs_diff: float = 0.0  # over the verified rounds
    devices: int = 0
    updates: int = 0  # ledger entries belonging to this state dir
    accepted_receipts: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return (self.rounds_verified == self.rounds_committed and not self.missing and not self.double_counted
                and not self.unledgered and not self.mismatches and not self.digest_mismatches
                and not self.unverifiable)

    def to_dict(self) -> dict:
        return {
            "clean": self.clean, "strategy": self.strategy, "rounds_committed": self.rounds_committed,
            "rounds_verified": self.rounds_verified, "missing": len(self.missing),
            "double_counted": len(self.double_counted), "unledgered": len(self.unledgered),
            "digest_mismatches": len(self.digest_mismatches), "unverifiable": len(self.unverifiable),
            "pending": len(self.pending),
            "first_mismatch": None if self.first_mismatch is None else
            {"round": self.first_mismatch[0], "device": self.first_mismatch[1]},
            "max_abs_diff": self.max_abs_diff, "devices": self.devices, "updates": self.updates,
            "accepted_receipts": self.accepted_receipts,
            "findings": {name: [f.to_dict() for f in getattr(self, name)]
                         for name in ("missing", "double_counted", "unledgered", "digest_mismatches", "unverifiable",
                                      "pending")},
            "mismatches": list(self.mismatches), "notes": list(self.notes),
        }


def audit(ledger_dir: str | os.PathLike[str], state_dir: str | os.PathLike[str], *,
          strategy: str | None = None, options: dict | None = None,
          rtol: float = RTOL, atol: float = ATOL) -> AuditReport:
    """Rebuild every committed model in ``state_dir`` from the ledgers in ``ledger_dir``.

    ``strategy``/``options`` default to what the state dir records (else fedavg, noted).
    Raises :class:`AuditError` for unusable input.

    >>> # report = audit("run/ledger", "run/state/coordinator"); report.clean, report.to_dict()["missing"]
    """
    log, ledgers = _load(Path(ledger_dir), Path(state_dir))
    report = AuditReport(strategy="")
    name, opts = _strategy(log, strategy, options, report)
    report.strategy = name
    scope = _in_scope(log, ledgers)
    by_key = {_key(e): e for e in scope}
    receipts = {(r.device, rnd, uid): rs for r in ledgers.values() for (rnd, uid), rs in r.receipts.items()}
    report.devices, report.updates = len(ledgers), len(scope)
    report.rounds_committed = len(log.commits)
    _rebuild(log, ledgers, by_key, scope, name, opts, rtol, atol, report)
    _check_devices(log, scope, receipts, report)
    return report


# -- input ----------------------------------------------------------------------------------------


def _load(ledger_dir: Path, state_dir: Path) -> tuple[CommitLog, dict[str, DeviceRecords]]:
    if not state_dir.is_dir():
        raise AuditError(f"state dir {state_dir}: not a directory")
    try:
        log = read_commit_log(state_dir)
    except FileNotFoundError:
        raise AuditError(f"state dir {state_dir}: no commits.log (not a coordinator --state-dir, "
                         f"or written before commit logs existed)") from None
    except Exception as err:  # noqa: BLE001 - any decode failure is bad input
        raise AuditError(f"state dir {state_dir}: commits.log is unreadable ({err})") from None
    if not ledger_dir.is_dir():
        raise AuditError(f"ledger dir {ledger_dir}: not a directory")
    try:
        ledgers = read_ledger_dir(ledger_dir)
    except Exception as err:  # noqa: BLE001
        raise AuditError(f"ledger dir {ledger_dir}: a ledger is unreadable ({err})") from None
    if not ledgers:
        raise AuditError(f"ledger dir {ledger_dir}: no *{SUFFIX} files (agents started without --ledger?)")
    modes = {o.mode for o in log.opens.values()}
    if "async" in modes:
        raise AuditError(f"state dir {state_dir}: async mode is not audited (an update may count in a later "
                         f"round than its own, and the state dir does not record which)")
    return log, ledgers


def _strategy(log: CommitLog, strategy: str | None, options: dict | None, report: AuditReport) -> tuple[str, dict]:
    if strategy is not None:
        name, opts = strategy, dict(options or {})
    elif log.strategy is not None:
        name, opts = log.strategy[0], dict(log.strategy[1]) if options is None else dict(options)
    else:
        name, opts = "fedavg", dict(options or {})
        report.notes.append("strategy: fedavg assumed (the state dir does not record one)")
    if name not in SUPPORTED:
        raise AuditError(f"strategy {name!r}: not replayable by the audit; supported: {', '.join(SUPPORTED)}")
    # As the coordinator's config reads them (TOML numbers may be floats); spool sizing does not change results.
    opts = {k: int(v) if k in ("num_byzantine", "multi", "block_values") and float(v).is_integer() else v
            for k, v in opts.items() if k != "chunk_rows"}
    return name, opts


def _key(e: UpdateEntry) -> tuple[str, int, str]:
    return e.device, e.round_id, e.update_id


def _counted(log: CommitLog) -> set[tuple[str, int, str]]:
    return {(device, c.round_id, uid) for c in log.commits for device, uid in c.updates.items()}


def _in_scope(log: CommitLog, ledgers: dict[str, DeviceRecords]) -> list[UpdateEntry]:
    counted = _counted(log)
    incarnations = {o.incarnation for o in log.opens.values()}

    def direct(e: UpdateEntry) -> bool:
        return _key(e) in counted or e.incarnation in incarnations

    def on_our_model(e: UpdateEntry) -> bool:
        o = log.opens.get(e.round_id)
        return o is not None and (e.base_version, e.base_digest) == (o.version, o.digest)

    out = []
    for r in ledgers.values():
        linked = {e.campaign for e in r.updates if direct(e)}
        out += [e for e in r.updates if direct(e) or (e.campaign in linked and on_our_model(e))]
    return out


# -- the models -------------------------------------------------------------------------------------


def _initial(log: CommitLog, ledgers: dict[str, DeviceRecords]) -> np.ndarray | None:
    if log.initial is not None:
        return log.initial
    digests = {o.digest for o in log.opens.values() if o.version == 0}
    for r in ledgers.values():
        for digest, vector in r.models.items():
            if digest in digests and vector_digest(vector) == digest:
                return vector
    return None


def _rebuild(log, ledgers, by_key, scope, name, opts, rtol, atol, report: AuditReport) -> None:
    if not log.commits:
        return
    num_params = log.commits[0].vector.size if log.commits[0].vector is not None else 0
    try:
        factory = make_strategy_factory(name, num_params, opts)
    except ValueError as err:
        raise AuditError(f"strategy {name!r} with options {opts}: {err}") from None
    base, base_version = _initial(log, ledgers), 0
    if base is None:
        report.notes.append("no initial model: no ledger holds version 0 (round 1 cannot be rebuilt)")
    counted = _counted(log)
    for c in log.commits:
        ok = _verify(c, base, base_version, factory, ledgers, by_key, counted, scope, rtol, atol, report)
        if ok:
            report.rounds_verified += 1
        base, base_version = c.vector, c.version


def _verify(c: CloseRecord, base, base_version, factory, ledgers, by_key, counted, scope, rtol, atol,
            report: AuditReport) -> bool:
    if c.vector is None or vector_digest(c.vector) != c.digest:
        report.unverifiable.append(Finding(c.round_id, None, None, "committed model missing or not its digest"))
        return False
    if base is None or base_version != c.version - 1:
        why = "no initial model" if base is None else f"version {c.version - 1} is not in the state dir"
        report.unverifiable.append(Finding(c.round_id, None, None, why))
        return False
    entries = []
    for device, uid in sorted(c.updates.items()):
        e = by_key.get((device, c.round_id, uid))
        if e is None:
            own = [x for x in scope if (x.device, x.update_id) == (device, uid)]
            if not own:
                why = "not in the device's ledger" if device in ledgers else "the device keeps no ledger here"
                report.unledgered.append(Finding(c.round_id, device, uid, why))
                continue
            if (device, own[0].round_id, uid) in counted:
                report.double_counted.append(Finding(c.round_id, device, uid, f"the update of round "
                                                     f"{own[0].round_id}, counted there too"))
            _mismatch(report, c, device, None, True, f"an update of round {own[0].round_id} counted here")
            return False
        if e.base_version != c.version - 1 or e.num_params != c.vector.size:
            _mismatch(report, c, device, None, True, f"the update trained on version {e.base_version}")
            return False
        entries.append(e)
    if len(entries) != len(c.updates):
        report.unverifiable.append(Finding(c.round_id, None, None, "counted updates missing from the ledgers"))
        return False
    before = factory_state(factory)

    def replay(parts: list[UpdateEntry]) -> np.ndarray | None:
        load_factory_state(factory, before)
        s = factory(base.size)
        for e in parts:
            s.add(e.delta, e.num_samples)
        new = s.finish(base)
        return None if new is None else model_store.exact_step(base, new)[1]

    def close(v: np.ndarray | None) -> bool:
        return v is not None and bool(np.all(np.abs(v - c.vector) <= atol + rtol * np.abs(c.vector)))

    got = replay(entries)
    if close(got):
        report.max_abs_diff = max(report.max_abs_diff, float(np.max(np.abs(got - c.vector))))
        return True
    diff = None if got is None else float(np.max(np.abs(got - c.vector)))
    others = [e for e in scope if e.round_id == c.round_id and e.base_version == c.version - 1
              and e.device not in c.updates]
    hypotheses = ([(e, "double_counted", entries + [e]) for e in entries]
                  + [(e, "missing", [x for x in entries if x is not e]) for e in entries]
                  + [(e, "unnamed", entries + [e]) for e in others])
    for e, kind, parts in hypotheses:
        if close(replay(parts)):
            if kind == "double_counted":
                report.double_counted.append(Finding(c.round_id, e.device, e.update_id, "folded into the model twice"))
            elif kind == "missing":
                report.missing.append(Finding(c.round_id, e.device, e.update_id,
                                              "counted by the coordinator, absent from the model"))
            _mismatch(report, c, e.device, diff, True, {
                "double_counted": "one update folded in twice", "missing": "a counted update is not in the model",
                "unnamed": "the model holds an update the coordinator does not name"}[kind])
            return False  # the factory's state is now the explaining replay's: later rounds go on from it
    device = _best_aligned(entries + others, c.vector - got) if got is not None else None
    replay(entries)
    _mismatch(report, c, device, diff, False, "the model differs from the rebuild")
    return False


def _mismatch(report: AuditReport, c: CloseRecord, device: str | None, diff: float | None, explained: bool,
              why: str) -> None:
    report.mismatches.append({"round": c.round_id, "version": c.version, "device": device, "max_abs_diff": diff,
                              "explained": explained, "why": why})
    _first(report, c.round_id, device)


def _best_aligned(entries: list[UpdateEntry], residual: np.ndarray) -> str | None:
    """The device whose delta has the largest |cosine| with the difference."""
    best, device = -1.0, None
    r = residual.astype(np.float64)
    rn = float(np.linalg.norm(r))
    for e in entries:
        d = e.delta.astype(np.float64)
        n = float(np.linalg.norm(d)) * rn
        cos = abs(float(d @ r)) / n if n > 0 else 0.0
        if cos > best:
            best, device = cos, e.device
    return device


def _first(report: AuditReport, round_id: int, device: str | None) -> None:
    if report.first_mismatch is None or round_id < report.first_mismatch[0]:
        report.first_mismatch = (round_id, device)


# -- the devices' side ---------------------------------------------------------------------------------


def _check_devices(log: CommitLog, scope: list[UpdateEntry], receipts, report: AuditReport) -> None:
    counted = _counted(log)
    closed = {c.round_id for c in log.commits} | set(log.abandoned)
    digests = {o.version: o.digest for o in log.opens.values() if o.version == 0}
    digests.update({c.version: c.digest for c in log.commits})
    for o in sorted(log.opens.values(), key=lambda o: o.round_id):
        if o.version in digests and digests[o.version] != o.digest:
            report.digest_mismatches.append(Finding(o.round_id, None, None, f"opened on a version {o.version} "
                                                    f"the state dir did not commit"))
    for e in sorted(scope, key=lambda e: (e.round_id, e.device)):
        if e.base_digest and e.base_version in digests and digests[e.base_version] != e.base_digest:
            report.digest_mismatches.append(Finding(e.round_id, e.device, e.update_id,
                                                    f"trained on a version {e.base_version} the state dir did "
                                                    f"not commit"))
        if not any(r.status == "accepted" for r in receipts.get(_key(e), ())):
            continue
        report.accepted_receipts += 1
        if _key(e) in counted:
            continue
        if e.round_id not in closed:
            report.pending.append(Finding(e.round_id, e.device, e.update_id, "its round is still open"))
        elif e.round_id in log.abandoned:
            report.missing.append(Finding(e.round_id, e.device, e.update_id, "accepted, but the round was abandoned"))
        else:
            report.missing.append(Finding(e.round_id, e.device, e.update_id, "accepted, but in no committed model"))
