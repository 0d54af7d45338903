"""``fedsync fieldtest``: the demo's federation through a chaos proxy, with crashes, and a report.

What it does, in order:

1. starts mosquitto (the production broker; amqtt if mosquitto is missing);
2. runs the federation fault-free, directly against the broker: the reference;
3. runs it again with the same seed with every device connection going
   through :class:`fedsync.lab.chaos.ChaosProxy` with a named link profile
   (latency, bandwidth cap, resets, stalls, blackouts), while
   * a fraction of the devices is killed mid-upload (socket dropped, host
     state gone) and restarted from its persistent outbox, and
   * the coordinator is crashed once mid-round (no DISCONNECT: its will fires)
     and restarted from its journal;
   With ``--profile hostile`` (:data:`fedsync.lab.chaos_profiles.SCENARIOS`) the faults are
   attacks instead: one device's trainer sends the issue-12 poison every round, one
   registered account floods junk and oversized shards (:mod:`fedsync.lab.hostile`), and
   mosquitto is SIGKILLed once mid-round and started again on its persistence file; the
   reference run is then the honest devices alone, on the same data;
4. audits the faulty run from outside (:mod:`fedsync.lab.audit`): every device keeps
   its own ledger of what it sent and the receipts it got, and every model the
   coordinator committed is rebuilt from those ledgers and compared; accepted
   updates missing from the model and contributions counted twice are listed;
5. writes ``report.json`` (per round: participants, drop-outs, retransmitted
   shards, duplicates dropped, bytes, accuracy, round time; the audit) and three PNG
   plots (accuracy per round against the fault-free run, bytes per round,
   devices online over time).

The coordinator runs beside the broker (direct connection); devices reach it
over the faulty links, as in the field. Both runs use the coordinator's default update
bounds (coordinator/hardening.py), as ``fedsync coordinator`` does with no configuration.
"""

from __future__ import annotations

from contextlib import contextmanager

import json
import math
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from tempfile import TemporaryDirectory

from fedsync.broker_config.process import BrokerProcess, mosquitto_available
from fedsync.coordinator.core import RoundPolicy
from fedsync.coordinator.hardening import REASONS, UpdateScreen
from fedsync.lab.audit import audit
from fedsync.lab.chaos_profiles import Scenario, get_scenario, hostile_roles
from fedsync.lab.federation import LocalFederation, RoundRecord, device_ids, make_users
from fedsync.lab.summary import number, print_summary
from fedsync.lab.chaos import ChaosProxy


@dataclass(frozen=True, slots=True)
class FieldtestOptions:
    devices: int = 20
    rounds: int = 15
    profile: str = "wifi-flaky"
    kill_fraction: float = 0.2
    seed: int = 0
    out: str = "fieldtest-report"
    json: bool = False
    keepalive: int = 5  # short, so half-open links (stalls) are noticed within a round
    resend_after: float = 4.0
    round_timeout: float = 40.0
    offline_grace: float = 10.0
    timeout: float = 900.0


@dataclass(slots=True)
class _Tap:
    """Per-round deltas of the agents' counters and the online count over time."""

    fed: LocalFederation
    t0: float
    last: dict
    rows: list
    online: list

    def on_round(self, rec: RoundRecord) -> None:
        now = self.fed.agent_stats()
        core = self.fed.coordinator.core
        cur = {**now, "duplicates_dropped": core.stats.duplicates_dropped}
        d = {k: cur.get(k, 0) - self.last.get(k, 0) for k in cur}
        self.last = cur
        self.rows.append({
            "round": rec.round_id, "outcome": rec.outcome, "reason": rec.reason, "selected": rec.selected,
            "participants": rec.accepted, "dropouts": rec.selected - rec.accepted,
            "retransmitted_shards": d.get("shards_resent", 0), "duplicates_dropped": d.get("duplicates_dropped", 0),
            "bytes_up": d.get("bytes_up", 0), "bytes_down": d.get("bytes_down", 0),
            "accuracy": rec.accuracy, "round_seconds": round(rec.seconds, 3),
            "at_seconds": round(time.perf_counter() - self.t0, 3)})

    def sample(self, stop: threading.Event) -> None:
        while not stop.wait(0.5):
            self.online.append((round(time.perf_counter() - self.t0, 2), len(self.fed.coordinator.core.online)))


def run_fieldtest(opts: FieldtestOptions) -> dict:
    from rich.console import Console

    console = Console(stderr=True)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    scenario = get_scenario(opts.profile)
    honest, poisoners, flooders = hostile_roles(opts.devices, scenario)
    agents = len(honest) + len(poisoners)  # flooders never train: they are accounts, not agents
    users = make_users(opts.devices)
    kind = "mosquitto" if mosquitto_available() else "amqtt"
    quorum = min(len(honest), max(1, math.ceil(0.6 * opts.devices)))
    # Rounds wait for a device that drops off for up to offline_grace (a flaky link, a reboot); the first
    # round opens once every device is online. The fault-free run uses the same policy.
    policy = RoundPolicy(rounds=opts.rounds, target=agents, quorum=quorum, min_devices=agents,
                         round_timeout=opts.round_timeout, offline_grace=opts.offline_grace)
    started = time.perf_counter()
    with TemporaryDirectory(prefix="fedsync-fieldtest-") as tmp, BrokerProcess(kind, users=users) as broker:
        with console.status(f"fault-free reference run ({len(honest)} devices, {opts.rounds} rounds)"):
            ref = _reference(broker, users, opts, policy, len(honest), agents)
            ref.start()
            ref_ok = ref.wait(opts.timeout)
            ref_summary = ref.summary()
            ref.stop()
        victims = honest[:round(opts.kill_fraction * opts.devices)] if scenario.device_kills else []
        with ChaosProxy(None, (broker.host, broker.port), scenario.link, seed=opts.seed) as proxy:
            result = _faulty_run(console, opts, users, policy, broker, proxy, victims, f"{tmp}/state",
                                 f"{tmp}/ledger", scenario, agents, poisoners, flooders)
            result["proxy"] = proxy.stats()
        with console.status("auditing every committed model against the device ledgers"):
            result["audit"] = audit(f"{tmp}/ledger", result["fed"].coordinator_state_dir).to_dict()
    result["roles"] = {"poisoners": poisoners, "flooders": flooders}
    report = _report(opts, kind, ref_ok, ref_summary, ref, result, victims, time.perf_counter() - started)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    _plots(report, out)
    _print(report, out, stderr=opts.json)  # with --json, stdout is the JSON document alone
    if opts.json:
        print(json.dumps(report["summary"]))
    return report


def _reference(broker, users, opts, policy, honest: int, agents: int) -> LocalFederation:
    """The fault-free run: every device, or (hostile) the honest ones alone on the data of all agents,
    scored on the same test set as the faulty run."""
    if honest == agents:
        return LocalFederation(broker.url, users, n_devices=agents, seed=opts.seed, policy=policy, federation="ref",
                               keepalive=opts.keepalive, resend_after=opts.resend_after, screen=UpdateScreen())
    from fedsync.device_agent.trainer import NumpyTrainer
    from fedsync.models import build_model
    from fedsync.synthetic import synthetic_federation, union

    data = synthetic_federation(num_devices=agents, seed=opts.seed)
    model = build_model("softmax", 60, 10)
    _, _, x_test, y_test = union(data)
    return LocalFederation(broker.url, users, n_devices=honest, seed=opts.seed, federation="ref",
                           policy=replace(policy, target=honest, min_devices=honest),
                           keepalive=opts.keepalive, resend_after=opts.resend_after, screen=UpdateScreen(),
                           make_trainer=lambda d, i: NumpyTrainer(model, data[i]),
                           score=lambda params: float((model.predict(params, x_test) == y_test).mean()))


def _faulty_run(console, opts, users, policy, broker, proxy, victims, state_dir, ledger_dir, scenario: Scenario,
                agents: int, poisoners: list[str], flooders: list[str]) -> dict:
    kill_round = {d: 2 + i % max(1, opts.rounds - 3) for i, d in enumerate(victims)}  # spread over the run
    crashed: dict[str, threading.Event] = {d: threading.Event() for d in victims}
    up_count = {d: 0 for d in victims}
    fed: LocalFederation
    events: list[dict] = []
    t0 = time.perf_counter()
    broker_kill_round = max(2, opts.rounds // 2)
    broker_kill = threading.Event() if scenario.broker_kill else None
    kill_lock, waiter_chosen = threading.Lock(), threading.Event()  # one device waits for a held update

    def hook(device: str, topic: str) -> None:
        # Kill a victim during its upload in its chosen round (topic: .../up/{device}/{round}/...).
        if device in crashed and not crashed[device].is_set() and "/up/" in topic:
            if int(topic.split("/")[4]) >= kill_round[device]:
                up_count[device] += 1
                fed.kill_device(device)
                crashed[device].set()
        # Kill the broker mid-round: a device is about to upload and another's update is already held.
        # The first device to upload in the kill round waits until one is: devices that finish
        # training together would otherwise all upload before any update is complete, and the kill
        # would never come (seen in CI under load). It waits on its own host's dispatcher thread,
        # so with a broker kill every device is hosted alone (`solo` below): on a shared host the
        # wait held back every other device's upload too, and each of its shards waited out the
        # 30 s in turn while the rounds expired (a 600 s hang in CI, stacks read with py-spy).
        if broker_kill is not None and not broker_kill.is_set() and "/up/" in topic \
                and int(topic.split("/")[4]) >= broker_kill_round:
            with kill_lock:
                waiter = not waiter_chosen.is_set() and device not in crashed
                if waiter:
                    waiter_chosen.set()
            deadline = time.monotonic() + (30.0 if waiter else 0.0)
            while True:
                with kill_lock:  # one device decides (and kills) at a time
                    if broker_kill.is_set():
                        return
                    r = fed.coordinator.core.round
                    if r is not None and r.assembler.accepted_devices:
                        broker_kill.set()
                        broker.kill()  # SIGKILL: no wills, the persistence file as last autosaved
                        events.append({"at": round(time.perf_counter() - t0, 2), "event": "broker_killed",
                                       "round": r.manifest.round_id, "held": len(r.assembler.accepted_devices)})
                        time.sleep(1.0)  # this device's upload waits in its client's queue meanwhile
                        broker.start()
                        events.append({"at": round(time.perf_counter() - t0, 2), "event": "broker_restarted"})
                        return
                    if time.monotonic() >= deadline:
                        if waiter:
                            waiter_chosen.clear()  # none held in time (the round moved on): a later upload waits
                        return
                time.sleep(0.01)

    make_trainer = None
    if poisoners:
        from fedsync.device_agent.trainer import NumpyTrainer
        from fedsync.lab.hostile import PoisonTrainer
        from fedsync.models import build_model
        from fedsync.synthetic import synthetic_federation

        data, model = synthetic_federation(num_devices=agents, seed=opts.seed), build_model("softmax", 60, 10)

        def make_trainer(d: str, i: int):  # the data LocalFederation would give each device, or the poison
            return PoisonTrainer() if d in poisoners else NumpyTrainer(model, data[i])

    solo = tuple(device_ids(agents)) if scenario.broker_kill else tuple(victims)
    fed = LocalFederation(proxy.url, users, n_devices=agents, seed=opts.seed, policy=policy,
                          federation="field", keepalive=opts.keepalive, resend_after=opts.resend_after,
                          state_dir=state_dir, coordinator_url=broker.url, solo=solo, publish_hook=hook,
                          ledger_dir=ledger_dir, screen=UpdateScreen(), make_trainer=make_trainer)
    tap = _Tap(fed, t0, {}, [], [])
    fed.on_round = tap.on_round
    stop_sampling = threading.Event()
    sampler = threading.Thread(target=tap.sample, args=(stop_sampling,), daemon=True)
    coordinator_crash_round = max(2, opts.rounds // 2)
    floods = []
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(f"[bold]{opts.profile}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[last]}"), TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("rounds", total=opts.rounds, last="")
        fed.start()
        sampler.start()
        if flooders:
            from fedsync.lab.hostile import Flooder

            floods = [Flooder(broker.url, fed.topics, d, users[d], seed=opts.seed, per_second=scenario.flood_per_s)
                      .start() for d in flooders]
        restarted: set[str] = set()
        coordinator_crashed = not scenario.coordinator_crash
        deadline = time.perf_counter() + opts.timeout
        while not fed.wait(0.2) and time.perf_counter() < deadline:
            committed = fed.coordinator.core.stats.rounds_committed
            progress.update(task, completed=committed,
                            last=f"online {len(fed.coordinator.core.online)}, resets {proxy.stats().get('resets', 0)}")
            for d in victims:
                if crashed[d].is_set() and d not in restarted:
                    fed.crash_device(d)
                    events.append({"at": round(time.perf_counter() - tap.t0, 2), "event": "device_killed", "device": d})
                    time.sleep(1.0)  # the phone reboots
                    fed.restart_device(d)
                    restarted.add(d)
                    events.append({"at": round(time.perf_counter() - tap.t0, 2), "event": "device_restarted", "device": d})
            r = fed.coordinator.core.round
            if (not coordinator_crashed and r is not None and r.manifest.round_id >= coordinator_crash_round
                    and r.assembler.accepted_devices):
                fed.crash_coordinator()
                events.append({"at": round(time.perf_counter() - tap.t0, 2), "event": "coordinator_killed",
                               "round": r.manifest.round_id})
                time.sleep(1.0)
                fed.restart_coordinator()
                coordinator_crashed = True
                events.append({"at": round(time.perf_counter() - tap.t0, 2), "event": "coordinator_restarted"})
        finished = fed.wait(0)
        summary = fed.summary()
        stop_sampling.set()
    for f in floods:
        f.stop()
    fed.stop()
    flood: dict[str, int] = {}
    for f in floods:
        for k, v in f.stats().items():
            flood[k] = flood.get(k, 0) + v
    return {"finished": finished, "summary": summary, "rows": tap.rows, "online": tap.online, "events": events,
            "fed": fed, "flood": flood, "updates_refused": fed.coordinator.core.stats.updates_refused}


def _report(opts, kind, ref_ok, ref_summary, ref, result, victims, wall) -> dict:
    fed: LocalFederation = result.pop("fed")
    s = result["summary"]
    rows = result["rows"]
    counted = sum(r["participants"] for r in rows if r["outcome"] == "committed")
    checked = result["audit"]
    # "Nothing lost, nothing counted twice" is the audit's verdict, made from the devices' own ledgers.
    summary = {
        "rounds_completed": s["rounds_completed"], "rounds_abandoned": s["rounds_abandoned"],
        "final_accuracy": s["final_accuracy"], "fault_free_final_accuracy": ref_summary["final_accuracy"],
        "accuracy_gap_pp": round(100 * (ref_summary["final_accuracy"] - s["final_accuracy"]), 3)
        if s["final_accuracy"] is not None else None,
        "updates_accepted": s["updates_accepted"], "updates_in_committed_rounds": counted,
        "audit": {k: v for k, v in checked.items() if k not in ("findings", "mismatches", "notes")},
        "duplicates_dropped": s["duplicates_dropped"], "shards_rejected": s["shards_rejected"],
        "shards_resent": s["shards_resent"], "bytes_up": s["bytes_up"], "bytes_down": s["bytes_down"],
        "devices_offline_detected": s["devices_offline_detected"], "devices_killed": victims,
        "finished": result["finished"], "fault_free_finished": ref_ok, "profile": opts.profile,
        "broker": kind, "wall_seconds": round(wall, 2),
        "updates_refused": result["updates_refused"],
        "refused_by_reason": {k: v for k, v in s["rejected_by_reason"].items() if k in REASONS},
        "poisoners": result["roles"]["poisoners"], "flooders": result["roles"]["flooders"],
        "flood_messages": sum(v for k, v in result["flood"].items() if k in ("flood_junk", "flood_shard",
                                                                              "flood_oversized")),
        "broker_kills": sum(e["event"] == "broker_killed" for e in result["events"]),
    }
    return {"summary": summary, "audit": checked, "rounds": rows, "flood": result["flood"],
            "rejected_by_reason": s["rejected_by_reason"],
            "fault_free_accuracy": ref_summary["accuracy_per_round"],
            "online": result["online"], "events": result["events"], "proxy": result["proxy"],
            "options": {k: getattr(opts, k) for k in opts.__dataclass_fields__}}


def _plots(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    @contextmanager
    def figure(name: str):
        fig, ax = plt.subplots(figsize=(6.5, 3.5))
        yield ax
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)

    rows = [r for r in report["rounds"] if r["outcome"] == "committed"]
    with figure("accuracy.png") as ax:
        ref = report["fault_free_accuracy"]
        ax.plot(range(1, len(ref) + 1), ref, marker="o", label="fault-free")
        ax.plot(range(1, len(rows) + 1), [r["accuracy"] for r in rows], marker="x",
                label=f"{report['summary']['profile']} + crashes")
        ax.set_xlabel("committed round")
        ax.set_ylabel("test accuracy")
        ax.legend()

    with figure("bytes.png") as ax:
        idx = range(1, len(report["rounds"]) + 1)
        ax.bar([i - 0.2 for i in idx], [r["bytes_up"] / 1024 for r in report["rounds"]], width=0.4, label="up (KiB)")
        ax.bar([i + 0.2 for i in idx], [r["bytes_down"] / 1024 for r in report["rounds"]], width=0.4,
               label="down (KiB)")
        ax.set_xlabel("round (in order closed)")
        ax.set_ylabel("KiB")
        ax.legend()

    with figure("online.png") as ax:
        if report["online"]:
            t, n = zip(*report["online"])
            ax.step(t, n, where="post", label="devices online (coordinator's view)")
        for e in report["events"]:
            ax.axvline(e["at"], color="red" if "killed" in e["event"] else "green", alpha=0.3, linewidth=1)
        ax.set_xlabel("seconds")
        ax.set_ylabel("devices online")
        ax.set_title("red: kills, green: restarts", fontsize=9)


# The summary's keys in the order printed, with the label a person reads.
_LABELS = (
    ("rounds_completed", "Rounds committed"),
    ("rounds_abandoned", "Rounds abandoned"),
    ("final_accuracy", "Final accuracy"),
    ("fault_free_final_accuracy", "Final accuracy without faults"),
    ("accuracy_gap_pp", "Accuracy gap (percentage points)"),
    ("updates_accepted", "Updates accepted"),
    ("duplicates_dropped", "Duplicate shards dropped"),
    ("shards_resent", "Shards re-sent"),
    ("shards_rejected", "Shards rejected"),
    ("devices_offline_detected", "Devices offline detected (last will)"),
    ("updates_refused", "Updates refused by the bounds"),
    ("flood_messages", "Flood messages sent"),
    ("broker_kills", "Broker kills (-9)"),
    ("bytes_up", "Bytes up"),
    ("bytes_down", "Bytes down"),
    ("wall_seconds", "Wall time (seconds)"),
)


def _print(report: dict, out: Path, stderr: bool = False) -> None:
    s = report["summary"]
    rows = [(label, number(s[key], digits=2 if key in ("accuracy_gap_pp", "wall_seconds") else 4))
            for key, label in _LABELS]
    a = s.get("audit")
    if a is not None:
        rows[6:6] = [
            ("Audit: committed models rebuilt from device ledgers",
             f"{a['rounds_verified']} / {a['rounds_committed']}"),
            ("Audit: accepted updates missing from the models", number(a["missing"])),
            ("Audit: contributions counted twice", number(a["double_counted"])),
            ("Audit verdict", "clean" if a["clean"] else f"FAILED (first mismatch {a['first_mismatch']})")]
    print_summary(f"fedsync fieldtest ({s['profile']}, {s['broker']})", [*rows, ("Report", str(out / "report.json"))],
                  stderr=stderr)
