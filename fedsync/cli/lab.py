"""The lab commands: ``fedsync demo``, ``fedsync fieldtest``, ``fedsync chaos`` (the fault proxy) and
``fedsync audit`` (committed models against the device ledgers)."""

from __future__ import annotations

import argparse
import os

from fedsync.log import configure

# fedsync.lab.project.FRAMEWORKS, written out for the same reason (tests/test_project.py compares them).
FRAMEWORKS = ("numpy", "sklearn", "pytorch")
# The names of fedsync.lab.chaos.PROFILES, written out so that --help need not import the proxy;
# tests/test_operator_errors.py checks that the two lists agree.
CHAOS_PROFILES = ("clean", "wifi-flaky", "cellular-3g", "blackout")
# fieldtest takes those and the names of fedsync.lab.chaos_profiles.SCENARIOS (checked by the same test).
FIELDTEST_PROFILES = (*CHAOS_PROFILES, "hostile")


def add_chaos(sub) -> None:
    # Listed in `fedsync --help` only: main() hands the arguments to the proxy's own parser.
    p = sub.add_parser("chaos", help="fault-injecting TCP proxy between agents and broker", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)


def add_fieldtest(sub) -> None:
    p = sub.add_parser("fieldtest", help="the federation through a chaos proxy, with crashes; writes a report")
    p.add_argument("--devices", type=int, default=20, metavar="N", help="device agents (count; default: %(default)s)")
    p.add_argument("--rounds", type=int, default=15, metavar="N",
                   help="committed rounds to run (count; default: %(default)s)")
    p.add_argument("--profile", default="wifi-flaky", choices=FIELDTEST_PROFILES,
                   help="chaos link profile, described in docs/chaos.md, or hostile: a poisoning and a flooding "
                   "device and a broker kill -9 (default: %(default)s)")
    p.add_argument("--kill-fraction", type=float, default=0.2, metavar="F",
                   help="fraction of devices killed mid-upload and restarted (0 to 1; default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the selection and the link faults "
                   "(default: %(default)s)")
    p.add_argument("--out", default="fieldtest-report", metavar="DIR",
                   help="directory for report.json and the plots (default: %(default)s)")
    p.add_argument("--json", action="store_true",
                   help="print only the summary, as one JSON document, on stdout (the table goes to stderr)")


def add_new(sub) -> None:
    p = sub.add_parser("new", help="write a project for your own model: trainer, initial model, agent and "
                       "coordinator configs (offline)")
    p.add_argument("directory", metavar="DIR", help="the project folder to create (must not exist or be empty)")
    p.add_argument("--framework", choices=FRAMEWORKS, default="numpy",
                   help="the trainer's framework (default: %(default)s); sklearn needs fedsync[sklearn], "
                   "pytorch needs torch")


def cmd_new(a: argparse.Namespace) -> int:
    import importlib.util
    import sys

    from fedsync.lab.project import NEEDS, write_project

    written = write_project(a.directory, a.framework)
    accounts = [path for path in written if path.parent.name == "secrets"]
    for path in written:
        if path not in accounts:
            print(f"wrote {path}")
    print(f"wrote {accounts[0].parent}{os.sep} (users.txt and {len(accounts) - 2} password files, owner-only)")
    print(f"next: fedsync demo --project {a.directory}")
    need = NEEDS[a.framework]
    if need is not None and importlib.util.find_spec(need[0]) is None:
        print(f"fedsync new: note: {need[0]} is not installed here; the project needs {need[1]}", file=sys.stderr)
    return 0


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="run a whole federation on loopback")
    p.add_argument("--devices", type=int, default=None, metavar="N",
                   help="device agents (count; default: 10, with --project the [trainer] devices of agent.toml)")
    p.add_argument("--project", metavar="DIR", help="run your own project (from fedsync new) instead of the "
                   "built-in model: its coordinator.toml, agent.toml and trainer.py (default: none)")
    p.add_argument("--rounds", type=int, default=None, metavar="N",
                   help="committed rounds to run (count; default: 80, or 20 sync rounds with --mode async)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the selection (default: %(default)s)")
    p.add_argument("--broker-kind", choices=["amqtt", "mosquitto"], default="amqtt",
                   help="broker to start on loopback (default: %(default)s)")
    p.add_argument("--mode", choices=["sync", "async", "semisync"], default="sync",
                   help="async: run sync and FedBuff with 30%% of devices 5x slower and compare wall times "
                   "(default: %(default)s)")
    p.add_argument("--slow", type=int, metavar="N", help="devices that are --slow-factor times slower "
                   "(count; default: 30%% of --devices with --mode async, else 0)")
    p.add_argument("--slow-factor", type=float, default=5.0, metavar="X",
                   help="how many times slower a slow device trains (factor; default: %(default)s)")
    p.add_argument("--codec", default=None, help="update codec, e.g. zstd, raw, fp16, int8, topk; "
                   "all names in docs/protocol.md (default: zstd, with --project the coordinator.toml's)")
    p.add_argument("--kill", type=int, default=0, metavar="N",
                   help="devices to kill after the first round (count; default: %(default)s)")
    p.add_argument("--plot", metavar="FILE", help="write accuracy per round as a PNG here (default: none, no plot)")
    p.add_argument("--json", action="store_true",
                   help="print only the summary, as one JSON document, on stdout (the table goes to stderr)")


def chaos_argv(rest: list[str]) -> int:
    """``fedsync chaos ...``: the proxy parses its own arguments, ``-h`` included."""
    from fedsync.lab.chaos import main as chaos_main

    return chaos_main(rest)


def cmd_fieldtest(a: argparse.Namespace) -> int:
    from fedsync.lab.fieldtest import FieldtestOptions, run_fieldtest

    configure("warning")
    report = run_fieldtest(FieldtestOptions(devices=a.devices, rounds=a.rounds, profile=a.profile,
                                            kill_fraction=a.kill_fraction, seed=a.seed, out=a.out, json=a.json))
    return 0 if report["summary"]["finished"] and report["audit"]["clean"] else 1


def add_audit(sub) -> None:
    p = sub.add_parser("audit", help="rebuild every committed model from the devices' ledgers; exit 1 on a mismatch")
    p.add_argument("--ledger", required=True, metavar="DIR",
                   help="directory of the devices' *.ledger files, from fedsync agent --ledger DIR "
                   "(required; default: none)")
    p.add_argument("--state-dir", required=True, metavar="DIR",
                   help="the coordinator's --state-dir (required; default: none)")
    p.add_argument("--strategy", metavar="NAME", help="strategy to replay: fedavg, mean, fedavgm, fedadam, median, "
                   "trimmed_mean, krum, multi_krum (default: the one the state dir records, else fedavg)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON document on stdout")


def cmd_audit(a: argparse.Namespace) -> int:
    """Exit 0: every committed model rebuilt, nothing missing or counted twice; 1: a finding; 2: bad input."""
    import json

    from fedsync.errors import OperatorError
    from fedsync.lab.audit import AuditError, audit
    from fedsync.lab.summary import number, print_summary

    try:
        report = audit(a.ledger, a.state_dir, strategy=a.strategy)
    except AuditError as err:
        raise OperatorError(str(err), code=2) from None
    d = report.to_dict()
    if a.json:
        print(json.dumps(d))
        return 0 if report.clean else 1
    first = d["first_mismatch"]
    print_summary(f"fedsync audit ({d['strategy']})", [
        ("Committed models rebuilt from device ledgers", f"{d['rounds_verified']} / {d['rounds_committed']}"),
        ("Accepted updates missing from the models", number(d["missing"])),
        ("Contributions counted twice", number(d["double_counted"])),
        ("Counted updates in no device ledger", number(d["unledgered"])),
        ("Model digests devices saw but not committed", number(d["digest_mismatches"])),
        ("Rounds that could not be rebuilt", number(d["unverifiable"])),
        ("Accepted in a round still open", number(d["pending"])),
        ("First mismatch", "none" if first is None else f"round {first['round']}, device {first['device']}"),
        ("Largest difference in a verified model", f"{d['max_abs_diff']:.3g}"),
        ("Devices / updates / accepted receipts", f"{d['devices']} / {d['updates']} / {d['accepted_receipts']}"),
        ("Verdict", "clean" if report.clean else "FAILED")])
    for kind, findings in d["findings"].items():
        for f in findings:
            print(f"{kind}: round {f['round']} device {f['device']} update {f['update_id']}: {f['why']}")
    for m in d["mismatches"]:
        print(f"mismatch: round {m['round']} (version {m['version']}) device {m['device']}: {m['why']}")
    for note in d["notes"]:
        print(f"note: {note}")
    return 0 if report.clean else 1


def cmd_demo(a: argparse.Namespace) -> int:
    configure("warning")
    if a.project is not None:
        return _demo_project(a)
    from fedsync.lab.demo import DemoOptions, run_demo

    summary = run_demo(DemoOptions(devices=10 if a.devices is None else a.devices, rounds=a.rounds, seed=a.seed,
                                   broker_kind=a.broker_kind, update_codec=a.codec or "zstd", json=a.json,
                                   plot=a.plot, kill=a.kill, mode=a.mode, slow=a.slow, slow_factor=a.slow_factor))
    return 0 if summary["finished"] else 1


def _demo_project(a: argparse.Namespace) -> int:
    from fedsync.errors import OperatorError
    from fedsync.lab.project import ProjectDemoOptions, run_project_demo

    if a.mode != "sync" or a.kill or a.slow:
        raise OperatorError("--project runs the project's own round rule: --mode, --kill and --slow are for "
                            "the built-in demo", code=2)
    summary = run_project_demo(ProjectDemoOptions(project=a.project, devices=a.devices, rounds=a.rounds, seed=a.seed,
                                                  broker_kind=a.broker_kind, update_codec=a.codec, json=a.json,
                                                  plot=a.plot))
    return 0 if summary["finished"] else 1
