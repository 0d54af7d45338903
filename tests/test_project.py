"""Your own model through the command line: fedsync new, demo --project, agent --trainer, coordinator --model.

Every command runs as a separate ``fedsync`` process, as an operator would type it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from fedsync.cli import lab as cli_lab
from fedsync.lab import project as lab_project
from fedsync.plugins import write_safetensors
from tests.cli_procs import FEDSYNC, Fleet

DEMO_KEYS = {"rounds_completed", "rounds_abandoned", "final_accuracy", "centralised_accuracy", "updates_accepted",
             "duplicates_dropped", "shards_rejected", "bytes_up", "bytes_down", "devices_offline_detected",
             "accuracy_per_round", "round_seconds", "finished", "mode", "devices", "broker", "wall_seconds"}


@pytest.fixture
def fleet(tmp_path: Path):
    f = Fleet(tmp_path / "logs")
    (tmp_path / "logs").mkdir()
    try:
        yield f
    finally:
        f.stop_all()


def test_the_cli_lists_the_frameworks_the_templates_have() -> None:
    assert cli_lab.FRAMEWORKS == lab_project.FRAMEWORKS == ("numpy", "sklearn", "pytorch")


@pytest.mark.parametrize("framework", ["numpy", "sklearn", "pytorch"])
def test_fedsync_new_writes_a_project(fleet, tmp_path, framework) -> None:
    folder = tmp_path / f"farm {framework}"
    code, out, err = fleet.run("new", [FEDSYNC, "new", str(folder), "--framework", framework])
    assert code == 0, err
    files = ["trainer.py", "coordinator.toml", "agent.toml", "README.md"]
    assert out.splitlines() == [f"wrote {folder / f}" for f in files] + [
        f"wrote {folder / 'secrets'}/ (users.txt and 12 password files, owner-only)",
        f"next: fedsync demo --project {folder}"]
    assert sorted(p.name for p in folder.iterdir()) == sorted([*files, "secrets"])
    accounts = ["coordinator", "monitor", *(f"dev-{i}" for i in range(10))]
    secrets = folder / "secrets"
    assert sorted(p.name for p in secrets.iterdir()) == sorted([".gitignore", "users.txt", *(f"{a}.pw" for a in accounts)])
    assert {p.stat().st_mode & 0o777 for p in secrets.iterdir()} == {0o600} and secrets.stat().st_mode & 0o777 == 0o700
    users = dict(line.split(":", 1) for line in (secrets / "users.txt").read_text().splitlines())
    assert list(users) == accounts and len(set(users.values())) == 12
    assert all((secrets / f"{a}.pw").read_text() == users[a] + "\n" for a in accounts)
    assert len((folder / "README.md").read_text().splitlines()) == 15
    assert f'name = "farm-{framework}"' in (folder / "agent.toml").read_text()
    assert 'init = "trainer:initial_params"' in (folder / "coordinator.toml").read_text()
    compile((folder / "trainer.py").read_text(), str(folder / "trainer.py"), "exec")
    # A folder that holds anything is refused, and nothing in it is touched.
    code, out, err = fleet.run("new", [FEDSYNC, "new", str(folder), "--framework", framework])
    assert (code, out, err.strip()) == (2, "", f"fedsync new: {folder}: exists and is not an empty folder; "
                                                "fedsync new writes a new project")


@pytest.mark.parametrize("framework, final, central", [("numpy", 0.9081, 0.9666), ("sklearn", 0.9359, 0.9666)])
def test_demo_project_json_has_the_demo_summary(fleet, tmp_path, framework, final, central) -> None:
    folder = tmp_path / "p"
    assert fleet.run("new", [FEDSYNC, "new", str(folder), "--framework", framework])[0] == 0
    code, out, err = fleet.run("demo", [FEDSYNC, "demo", "--project", str(folder), "--rounds", "5", "--json"],
                               timeout=180)
    assert code == 0, err[-3000:]
    summary = json.loads(out)  # stdout is the JSON document alone
    assert DEMO_KEYS <= set(summary)
    assert (summary["rounds_completed"], summary["rounds_abandoned"], summary["updates_accepted"],
            summary["shards_rejected"], summary["devices"], summary["finished"]) == (5, 0, 50, 0, 10, True)
    # Measured (every device in every round, seeded per device and round: the same each run).
    assert summary["final_accuracy"] == pytest.approx(final, abs=0.003)
    assert summary["centralised_accuracy"] == pytest.approx(central, abs=0.003)
    assert len(summary["accuracy_per_round"]) == 5


def test_demo_project_mistakes_are_one_line(fleet, tmp_path) -> None:
    code, out, err = fleet.run("demo", [FEDSYNC, "demo", "--project", str(tmp_path / "none")])
    assert (code, err.strip()) == (2, f"fedsync demo: --project: {tmp_path / 'none'} is not a folder "
                                      f"(make one with fedsync new {tmp_path / 'none'})")
    folder = tmp_path / "p"
    assert fleet.run("new", [FEDSYNC, "new", str(folder)])[0] == 0
    code, out, err = fleet.run("demo", [FEDSYNC, "demo", "--project", str(folder), "--kill", "2"])
    assert (code, err.strip()) == (2, "fedsync demo: --project runs the project's own round rule: --mode, --kill "
                                      "and --slow are for the built-in demo")
    (folder / "trainer.py").write_text((folder / "trainer.py").read_text().replace("def global_accuracy", "def _ga"))
    code, out, err = fleet.run("demo", [FEDSYNC, "demo", "--project", str(folder)])
    assert (code, err.strip()) == (2, f"fedsync demo: {folder / 'trainer.py'}: has no function global_accuracy(...); "
                                      "fedsync demo --project needs global_accuracy(params, section) and "
                                      "centralised_accuracy(section)")


def test_plugin_mistakes_end_the_services_with_one_line(fleet, tmp_path) -> None:
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    np.savez(tmp_path / "f64.npz", w=np.zeros(3))
    cases = [
        (["agent", "--device-id", "dev-0", "--trainer", "no_such_module:make"],
         "fedsync agent: trainer 'no_such_module:make': module 'no_such_module' not found"),
        (["agent", "--device-id", "dev-0", "--trainer", "json:loads"],
         "fedsync agent: trainer 'json:loads': the factory raised TypeError: loads() takes 1 positional argument "
         "but 2 were given"),
        (["agent", "--device-id", "dev-0", "--trainer", "builtins:dict"],
         "fedsync agent: trainer 'builtins:dict': the factory raised TypeError: dict expected at most 1 argument, "
         "got 2"),
        (["agent", "--device-id", "dev-0", "--trainer", "builtins:print"],
         "fedsync agent: trainer 'builtins:print': the factory returned a NoneType, not a Trainer (with fit and "
         "evaluate)"),
        (["coordinator", "--model", str(tmp_path / "none.safetensors")],
         f"fedsync coordinator: model file '{tmp_path / 'none.safetensors'}': not found"),
        (["coordinator", "--model", str(tmp_path / "f64.npz")],
         f"fedsync coordinator: model file '{tmp_path / 'f64.npz'}': tensor 'w' is float64, expected float32"),
        (["coordinator", "--model", "fedsync.models:missing"],
         "fedsync coordinator: model 'fedsync.models:missing': module 'fedsync.models' has no attribute 'missing'"),
    ]
    for argv, line in cases:
        code, out, err = fleet.run("mistake", [FEDSYNC, *argv, "--broker", "mqtt://127.0.0.1:9"])
        assert (code, err.strip()) == (2, line), argv


@pytest.mark.broker
def test_the_two_services_run_a_project_with_a_model_file(fleet, tmp_path, broker, broker_users) -> None:
    """coordinator --model init.safetensors and four agents --trainer trainer:make_trainer, as processes."""
    folder = tmp_path / "p"
    assert fleet.run("new", [FEDSYNC, "new", str(folder), "--framework", "numpy"])[0] == 0
    sys.path.insert(0, str(folder))
    try:
        import trainer  # the project's own module, as the services load it

        write_safetensors(tmp_path / "init.safetensors", trainer.initial_params())
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("trainer", None)
    for name in ["coordinator", *(f"dev-{i}" for i in range(4))]:
        (tmp_path / f"{name}.pw").write_text(broker_users[name] + "\n")
    common = ["--broker", broker.url, "--federation", "byo"]
    coordinator = fleet.start("coordinator", [
        FEDSYNC, "coordinator", "--config", str(folder / "coordinator.toml"), *common,
        "--password-file", str(tmp_path / "coordinator.pw"), "--model", str(tmp_path / "init.safetensors"),
        "--rounds", "3", "--target", "4", "--quorum", "4", "--min-devices", "4", "--round-timeout", "30"])
    # The agents run from elsewhere: the factory's module is found beside their agent.toml.
    agents = [fleet.start(f"agent-{i}", [
        FEDSYNC, "agent", "--config", str(folder / "agent.toml"), *common, "--device-id", f"dev-{i}",
        "--password-file", str(tmp_path / f"dev-{i}.pw"), "--trainer", "trainer:make_trainer", "--once"])
        for i in range(4)]
    assert coordinator.wait(120) == 0, fleet.tails()
    assert [a.wait(30) for a in agents] == [0] * 4, fleet.tails()
    start = coordinator.events("coordinator_start")[0]
    assert (start.fields["model"], start.fields["tensors"], start.fields["params"]) == (
        str(tmp_path / "init.safetensors"), "2", "650")
    assert [line.int("round") for line in coordinator.events("round_committed")] == [1, 2, 3]
    # The coordinator's view of training: each round line carries the sample-weighted mean of the
    # train_loss the four devices logged for that round, read here from the devices' own logs.
    for line in coordinator.events("round_committed"):
        done = [d for a in agents for d in a.events("round_done", round=line.fields["round"])]
        assert len(done) == 4, fleet.tails(["agent"])
        want = sum(float(d.fields["train_loss"]) * d.int("samples") for d in done) / sum(d.int("samples") for d in done)
        assert float(line.fields["mean_train_loss"]) == pytest.approx(want, rel=1e-5), line
    assert [a.events("agent_start")[0].fields["trainer"] for a in agents] == ["trainer:make_trainer"] * 4
    assert all(len(a.events("round_done", status="accepted")) == 3 for a in agents), fleet.tails(["agent"])
    assert os.path.isfile(folder / "trainer.py") and not (Path.cwd() / "trainer.py").exists()


def test_the_project_readme_service_commands_federate_as_written(fleet, tmp_path) -> None:
    """The generated README's three service lines, run verbatim from the project folder as
    separate processes (10 agents: dev-0 .. dev-9, as its comment says). Only the port differs:
    a free one instead of 1883 (the broker's --port, the TOMLs' url), and --rounds 2 keeps it short."""
    import re

    from fedsync.broker_config.process import free_port

    folder = tmp_path / "farm"
    assert fleet.run("new", [FEDSYNC, "new", str(folder)])[0] == 0
    readme = (folder / "README.md").read_text()
    lines = [line.strip().split("   #")[0].split() for line in readme.splitlines()
             if re.match(r"    fedsync (broker|coordinator|agent) ", line)]
    assert [argv[1] for argv in lines] == ["broker", "coordinator", "agent"], readme
    port = free_port()
    for name in ("coordinator.toml", "agent.toml"):
        path = folder / name
        path.write_text(path.read_text().replace("127.0.0.1:1883", f"127.0.0.1:{port}"))

    def start(role: str, argv: list[str]):
        return fleet.start(role, [FEDSYNC, *argv[1:]], cwd=folder)  # the console script of this venv

    broker_argv, coordinator_argv, agent_argv = lines
    broker = start("broker", [*broker_argv, "--port", str(port)])
    coordinator = start("coordinator", [*coordinator_argv, "--rounds", "2"])
    fleet.wait_for("the coordinator to wait for the devices",
                   lambda: coordinator.events("waiting_for_devices", online="0", needed="10"), 60,
                   needs=[broker, coordinator])
    agents = [start(f"agent-{i}", [a.replace("dev-0", f"dev-{i}") for a in agent_argv] + ["--once"])
              for i in range(10)]
    assert coordinator.wait(240) == 0, fleet.tails(["coordinator", "broker"])
    assert [a.wait(60) for a in agents] == [0] * 10, fleet.tails(["agent"])
    assert [e.int("round") for e in coordinator.events("round_committed")] == [1, 2]
    assert all(len(a.events("round_done", status="accepted")) == 2 for a in agents), fleet.tails(["agent"])
