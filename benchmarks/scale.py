"""1,000 simulated devices on one mosquitto and one coordinator: what does a round cost the coordinator?

    python benchmarks/scale.py                                   # 1000 devices, 200 participants, 100k params
    python benchmarks/scale.py --devices 300 --participants 100 --params 10000 --rounds 2

What runs (127.0.0.1 only; everything started here is stopped here):

* mosquitto via BrokerProcess with a password for every device (``mosquitto_passwd -U``
  hashes the whole file in one run: ~1.5 s for 1,000 users here) and the project's
  rendered config (no ``max_connections`` line: mosquitto's default, unlimited; its file
  limit is inherited from this process, whose soft RLIMIT_NOFILE is raised if needed).
* the coordinator (CoordinatorService) in its own process, so its CPU seconds and peak
  RSS (VmHWM) are its own; it waits until all devices are online (min_devices = devices)
  and then selects ``--participants`` of them per round (target = quorum = participants).
* all devices in one Swarm (one selector thread, one MQTT connection each, connected in
  waves of ``--max-connecting``), NoiseTrainer (params + 1e-3 noise, 100 samples).
* two counting TCP proxies (``benchmarks.common.CountingProxy``: ChaosProxy's clean profile,
  each in a process of its own): one in front of the broker for the devices, one for the
  coordinator, so bytes per round are TCP payload bytes on each side.

Per round it reports: wall time (manifest issued -> commit), coordinator CPU seconds,
device-side MQTT PUBLISH packets (sent by devices / delivered to devices) and bytes.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import secrets
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import CountingProxy, raise_nofile  # noqa: E402
from benchmarks.round_time import FEDERATION, NOISE, SAMPLES, coordinator_main, stop_coordinator  # noqa: E402


def peak_rss(pid: int) -> int:
    """VmHWM (peak resident set) of ``pid`` in bytes."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(proc) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def nofile_of(pid: int) -> str:
    with open(f"/proc/{pid}/limits", encoding="ascii") as f:
        for line in f:
            if line.startswith("Max open files"):
                return line.split()[3]
    return "?"


def run(devices: int, participants: int, params: int, rounds: int, codec: str, max_connecting: int) -> dict:
    import psutil

    from fedsync.broker_config.process import BrokerProcess
    from fedsync.device_agent.service import DeviceSpec
    from fedsync.lab.swarm import NoiseTrainer, Swarm
    from fedsync.address import Credentials
    from fedsync.topics import Topics

    soft_before = __import__("resource").getrlimit(__import__("resource").RLIMIT_NOFILE)[0]
    soft = raise_nofile(3 * devices + 1024)
    facts: dict = {"nofile_soft_before": soft_before, "nofile_soft": soft}
    users = {"coordinator": secrets.token_urlsafe(12), **{f"dev-{i}": secrets.token_urlsafe(12) for i in range(devices)}}
    policy = dict(rounds=rounds, target=participants, quorum=participants, min_devices=devices,
                  round_timeout=600.0, model_codec=codec, update_codec=codec)
    ctx = mp.get_context("spawn")
    events, stop = ctx.Queue(), ctx.Event()
    t0 = time.monotonic()
    broker = BrokerProcess("mosquitto", users=users)
    broker.start()
    facts["broker_start_s"] = time.monotonic() - t0  # includes hashing every password
    conf = (broker.workdir / "mosquitto.conf").read_text()
    facts["max_connections"] = next((ln.split()[1] for ln in conf.splitlines() if ln.startswith("max_connections")),
                                    "unset (mosquitto default: unlimited)")
    facts["mosquitto_nofile"] = nofile_of(broker.pid)
    dev_proxy = CountingProxy(broker.port).start()
    coord_proxy = CountingProxy(broker.port).start()
    swarm = None
    coord = ctx.Process(target=coordinator_main, args=(f"mqtt://127.0.0.1:{coord_proxy.port}", users["coordinator"],
                                                        policy, params, events, stop, 0), daemon=True)
    rows: list[dict] = []
    stats: dict = {}
    try:
        coord.start()
        kind, coord_pid = events.get(timeout=60)
        cproc = psutil.Process(coord_pid)
        bproc = psutil.Process(broker.pid)
        me = psutil.Process()
        specs = [DeviceSpec(f"dev-{i}", NoiseTrainer(SAMPLES, NOISE), Credentials(f"dev-{i}", users[f"dev-{i}"]))
                 for i in range(devices)]
        swarm = Swarm(f"mqtt://127.0.0.1:{dev_proxy.port}", Topics(FEDERATION), specs, seed=0,
                      max_connecting=max_connecting, keepalive=60)
        t_conn = time.monotonic()
        swarm.start()
        if not swarm.wait_connected(devices, 300):
            raise RuntimeError(f"only {swarm.connected_count()} of {devices} devices connected in 300 s")
        facts["connect_all_s"] = time.monotonic() - t_conn
        facts["idle_coordinator_cpu_s"] = cpu_seconds(cproc)

        def snapshot() -> dict:
            s = swarm.stats()
            return {"cpu": cpu_seconds(cproc), "broker_cpu": cpu_seconds(bproc), "swarm_cpu": cpu_seconds(me),
                    "dev": dev_proxy.counts(), "coord": coord_proxy.counts(),
                    "pub": s["published"], "recv": s["received"]}

        last = snapshot()
        deadline = time.monotonic() + 600 * rounds
        while len(rows) < rounds and time.monotonic() < deadline:
            try:
                kind, body = events.get(timeout=1.0)
            except Exception:  # noqa: BLE001 - queue.Empty
                continue
            if kind != "round":
                continue
            # Rounds run back to back: everything is counted between successive commits (the
            # coordinator's CPU at the commit itself, the proxies' and swarm's counters on arrival).
            now = snapshot()
            now["cpu"] = body["cpu"]
            rows.append({**body, "coord_cpu": now["cpu"] - last["cpu"], "broker_cpu": now["broker_cpu"] - last["broker_cpu"],
                         "swarm_cpu": now["swarm_cpu"] - last["swarm_cpu"],
                         "dev_up": now["dev"][0] - last["dev"][0], "dev_down": now["dev"][1] - last["dev"][1],
                         "coord_in": now["coord"][1] - last["coord"][1], "coord_out": now["coord"][0] - last["coord"][0],
                         "msgs_up": now["pub"] - last["pub"], "msgs_down": now["recv"] - last["recv"]})
            last = now
        if len(rows) < rounds:
            raise RuntimeError(f"{len(rows)} of {rounds} rounds committed in time")
        facts["coordinator_cpu_total_s"] = cpu_seconds(cproc)
        facts["coordinator_peak_rss"] = peak_rss(coord_pid)
        facts["swarm_peak_rss"] = peak_rss(os.getpid())
        facts["broker_peak_rss"] = peak_rss(broker.pid)
        facts["device_connections"] = dev_proxy.counts()[2]
        facts["swarm_connects"] = swarm.stats()["connects"]
    finally:
        if swarm is not None:
            swarm.stop()
        stats = stop_coordinator(coord, stop, events, 20) or stats
        dev_proxy.stop()
        coord_proxy.stop()
        broker.stop()
    return {"facts": facts, "rounds": rows, "stats": stats}


def report(args, out: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    f, s = out["facts"], out["stats"]
    c = Console(width=200)
    t = Table(title=f"fedsync at scale: {args.devices} devices online, {args.participants} participants/round, "
                    f"{args.params:,} params, codec {args.codec}")
    for col in ("round", "outcome", "accepted", "s/round", "coord CPU s", "broker CPU s", "swarm CPU s",
                "PUBLISH dev->broker", "PUBLISH broker->dev", "MB dev up", "MB dev down", "MB coord in",
                "MB coord out"):
        t.add_column(col, justify="right")
    for r in out["rounds"]:
        t.add_row(str(r["round_id"]), r["outcome"], str(r["accepted"]), f"{r['seconds']:.2f}", f"{r['coord_cpu']:.2f}",
                  f"{r['broker_cpu']:.2f}", f"{r['swarm_cpu']:.2f}", f"{r['msgs_up']:,}", f"{r['msgs_down']:,}",
                  f"{r['dev_up'] / 1e6:.1f}", f"{r['dev_down'] / 1e6:.1f}", f"{r['coord_in'] / 1e6:.1f}",
                  f"{r['coord_out'] / 1e6:.1f}")
    c.print(t)
    t2 = Table(title="process facts")
    t2.add_column("fact")
    t2.add_column("value", justify="right")
    for k, v in [("coordinator CPU s, whole run (incl. 1000 connects)", f"{f['coordinator_cpu_total_s']:.2f}"),
                 ("coordinator CPU s while devices connected (idle)", f"{f['idle_coordinator_cpu_s']:.2f}"),
                 ("coordinator peak RSS MB", f"{f['coordinator_peak_rss'] / 2**20:.0f}"),
                 ("swarm process peak RSS MB", f"{f['swarm_peak_rss'] / 2**20:.0f}"),
                 ("mosquitto peak RSS MB", f"{f['broker_peak_rss'] / 2**20:.0f}"),
                 ("broker start incl. password file, s", f"{f['broker_start_s']:.2f}"),
                 (f"connect all {args.devices} devices (waves of {args.max_connecting}), s", f"{f['connect_all_s']:.2f}"),
                 ("device TCP connections / MQTT sessions", f"{f['device_connections']} / {f['swarm_connects']}"),
                 ("RLIMIT_NOFILE soft: before / after raise", f"{f['nofile_soft_before']} / {f['nofile_soft']}"),
                 ("mosquitto max open files", f["mosquitto_nofile"]),
                 ("mosquitto max_connections", f["max_connections"]),
                 ("coordinator: accepted / duplicates / rejected",
                  f"{s.get('updates_accepted')} / {s.get('duplicates_dropped')} / {s.get('shards_rejected')}")]:
        t2.add_row(k, str(v))
    c.print(t2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--participants", type=int, default=200)
    ap.add_argument("--params", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--codec", default="zstd")
    ap.add_argument("--max-connecting", type=int, default=64, help="devices between TCP connect and CONNACK at once")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    if not 1 <= a.participants <= a.devices:
        ap.error("need 1 <= participants <= devices")
    out = run(a.devices, a.participants, a.params, a.rounds, a.codec, a.max_connecting)
    report(a, out)
    if a.json:
        import json

        a.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
