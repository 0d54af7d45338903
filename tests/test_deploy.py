"""deploy/: the files an operator installs must at least parse, agree with the code, and
(where it can run here) work.

systemd units go through ``systemd-analyze verify``; shell scripts through ``bash -n``
and shellcheck (each where installed, always in CI); install.sh runs for real into a scratch root and
the agent config it writes is loaded by the agent's own config loader; the compose files
parse as YAML with the services and mounts they promise (no Docker engine here); the wheel
built from the image's build context holds every package and its data, and nothing tells a
user to `pip install fedsync` from PyPI, where it is not published; and the mosquitto
edge/root bridge from deploy/cluster carries a whole federation on loopback.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from fedsync.config import load_config
from tests.util import on_service_thread, wait_until

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
UNITS = [DEPLOY / "systemd" / "fedsync-coordinator.service", DEPLOY / "systemd" / "fedsync-agent@.service"]
SCRIPTS = [DEPLOY / "raspberry-pi" / "install.sh", DEPLOY / "termux" / "boot-fedsync-agent.sh"]
# systemd < 254 does not know these two (exponential restart backoff) and ignores them.
NEWER_SYSTEMD_KEYS = ("RestartSteps", "RestartMaxDelaySec")


def program(name: str) -> str:
    """The path of a checker these tests run. Skipped where it is not installed, except in CI:
    .ci/run installs it, so a missing one there is an install bug, not a reason to skip."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI: {name} is not installed; .ci/run must install it")
        pytest.skip(f"{name} is not installed")
    return path


def test_a_missing_checker_fails_in_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setenv("PATH", "")  # nothing is installed
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI: shellcheck is not installed; .ci/run must install it"):
        program("shellcheck")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="shellcheck is not installed"):
        program("shellcheck")
    monkeypatch.setenv("PATH", os.defpath)
    assert program("sh") == shutil.which("sh")  # the control: an installed one is found


def test_ci_installs_every_checker_these_tests_run():
    # .ci/run maps each program to the Debian package that provides it and installs the missing ones.
    ci = (REPO / ".ci" / "run").read_text()
    for name, package in [("systemd-analyze", "systemd"), ("shellcheck", "shellcheck"), ("mosquitto", "mosquitto")]:
        assert f"[{name}]={package}" in ci, name


def unit(path: Path) -> dict[str, dict[str, str]]:
    """Parse a unit file as systemd does: sections, ``Key=value`` lines, keys case-sensitive,
    a repeated key (Environment=) accumulating; anything else is an error. The last value wins
    in the returned mapping, the full list is under ``key + "[]"``."""
    sections: dict[str, dict[str, str]] = {}
    current = None
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith(("#", ";")):
            continue
        if line.startswith("["):
            assert line.endswith("]") and line[1:-1] not in sections, f"{path.name}:{n}: bad or repeated section"
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, f"{path.name}:{n}: not Key=value in a section: {line!r}"
        key, _, value = line.partition("=")
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", key), f"{path.name}:{n}: bad key {key!r}"
        current[key] = value
        current[key + "[]"] = current.get(key + "[]", "") + value + "\n"
    return sections


# -- systemd ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_units_have_the_promised_restart_user_and_hardening(path):
    u = unit(path)
    assert set(u) == {"Unit", "Service", "Install"}
    s = u["Service"]
    assert s["User"] == s["Group"] == "fedsync"
    assert s["Restart"] == "on-failure" and s["RestartSec"] and s["RestartMaxDelaySec"]
    assert u["Unit"]["StartLimitIntervalSec"] == "0"  # never give up on a flaky link
    assert s["NoNewPrivileges"] == "yes" and s["ProtectSystem"] == "strict" and s["ProtectHome"] == "yes"
    assert s["CapabilityBoundingSet"] == ""
    # ProtectSystem=strict makes everything read-only: the journal/outbox dir must be a StateDirectory.
    state = s["StateDirectory"]
    assert f"--state-dir %S/{state}" in s["ExecStart"]
    assert "--config /etc/fedsync/" in s["ExecStart"]
    assert u["Install"]["WantedBy"] == "multi-user.target"


def test_the_agent_unit_is_templated_by_device_id():
    s = unit(UNITS[1])["Service"]
    assert "--device-id %i" in s["ExecStart"] and "--password-file /etc/fedsync/%i.pw" in s["ExecStart"]
    assert s["StateDirectory"] == "fedsync/agent-%i"


def test_exec_start_flags_exist_in_the_cli():
    from fedsync.cli import build_parser

    for path in UNITS:
        argv = unit(path)["Service"]["ExecStart"].replace("%S", "/var/lib").replace("%i", "dev-1").split()[1:]
        args = build_parser().parse_args(argv)  # SystemExit on an unknown flag
        assert args.command in ("coordinator", "agent")


def test_systemd_analyze_verify_finds_nothing_wrong(tmp_path):
    analyze = program("systemd-analyze")
    # verify checks that ExecStart exists: point it at a real binary; a template needs an instance.
    names = []
    for path in UNITS:
        text = path.read_text().replace("/opt/fedsync/venv/bin/fedsync", shutil.which("true") or "/bin/true")
        name = path.name.replace("@.service", "@dev-1.service")
        (tmp_path / name).write_text(text)
        names.append(name)
    result = subprocess.run([analyze, "verify", *names], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if line.strip() and not any(f"Unknown key '{k}'" in line for k in NEWER_SYSTEMD_KEYS)]
    assert result.returncode == 0 and problems == [], problems


# -- shell scripts ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse(path):
    assert path.stat().st_mode & 0o111, f"{path} is not executable"
    assert path.read_text().startswith("#!")
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_pass_shellcheck(path):
    result = subprocess.run([program("shellcheck"), str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


def run_install(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPTS[0]), "--root", str(root), *args], capture_output=True, text=True,
                          timeout=60)


def test_install_sh_writes_a_config_the_agent_loads_and_reruns_change_nothing(tmp_path):
    from fedsync.device_agent.config import AgentConfig

    (tmp_path / "pw").write_text("s3cret\nignored second line\n")
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    root = tmp_path / "root"
    args = ["--broker", "mqtts://broker.lan:8883", "--device-id", "pi-kitchen", "--data-index", "3",
            "--password-file", str(tmp_path / "pw"), "--ca-file", str(tmp_path / "ca.pem"), "--federation", "farm"]
    first = run_install(root, *args)
    assert first.returncode == 0, first.stderr
    etc = root / "etc" / "fedsync"
    assert (etc / "pi-kitchen.pw").read_text() == "s3cret\n"
    assert (etc / "pi-kitchen.pw").stat().st_mode & 0o777 == 0o640
    assert (etc / "agent.toml").stat().st_mode & 0o777 == 0o640
    assert (root / "etc/systemd/system/fedsync-agent@.service").read_text() == UNITS[1].read_text()
    # What the unit runs: the shared file plus the instance's flags, through the agent's own loader.
    cfg = load_config(AgentConfig, etc / "agent.toml", {"agent.device_id": "pi-kitchen",
                                                         "broker.password_file": str(etc / "pi-kitchen.pw")},
                      check_files=False)  # it names /etc/fedsync/ca.pem of the Pi, not of this host
    assert (cfg.broker.url, cfg.broker.ca_file, cfg.federation.name, cfg.data.index) == (
        "mqtts://broker.lan:8883", "/etc/fedsync/ca.pem", "farm", 3)

    again = run_install(root, *args)
    assert again.returncode == 0 and "wrote" not in again.stdout  # idempotent: nothing rewritten

    moved = run_install(root, *[a if a != "mqtts://broker.lan:8883" else "mqtts://broker2.lan:8883" for a in args])
    assert moved.stdout.count("wrote") == 1 and "agent.toml" in moved.stdout
    # Without --package it installs the checkout it lives in, not a name PyPI does not have.
    assert f"the package would be {REPO})" in first.stdout


def test_install_sh_takes_a_wheel_or_a_source_directory_or_a_git_url(tmp_path):
    (tmp_path / "pw").write_text("pw\n")
    wheel = tmp_path / "fedsync-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK")  # only its existence is checked with --root (no pip)
    base = ["--broker", "mqtt://broker.lan:1883", "--device-id", "pi-07", "--password-file", str(tmp_path / "pw")]
    for package in (str(wheel), f"{wheel}[signing]", str(REPO), "fedsync @ git+https://git.example/fedsync.git"):
        result = run_install(tmp_path / "root", *base, "--package", package)
        assert result.returncode == 0, result.stderr
        assert f"the package would be {package})" in result.stdout


@pytest.mark.parametrize("bad, complaint", [
    (["--device-id", "pi kitchen"], "must match"),
    (["--device-id", "coordinator"], "reserved"),
    (["--broker", "http://x:1"], "mqtt(s)://"),
    (["--device-id", "pi-kitchen"], "--data-index is required"),
    (["--frobnicate"], "unknown argument"),
    (["--package", "/nonexistent/fedsync-0.1.0-py3-none-any.whl"], "cannot read wheel"),
    (["--package", "/"], "no pyproject.toml"),
])
def test_install_sh_refuses_bad_arguments_before_touching_anything(tmp_path, bad, complaint):
    (tmp_path / "pw").write_text("pw\n")
    base = {"--broker": "mqtt://broker.lan:1883", "--device-id": "pi-07", "--password-file": str(tmp_path / "pw")}
    args = [x for k, v in base.items() for x in (k, v)] + bad
    result = run_install(tmp_path / "root", *args)
    assert result.returncode == 2 and complaint in result.stderr
    assert not (tmp_path / "root").exists()


# -- CI -------------------------------------------------------------------------------------------

def test_ci_runs_the_readme_commands_verbatim_in_a_fresh_venv():
    root = DEPLOY.parent
    readme = (root / "README.md").read_text().split("```sh\n", 1)[1].split("```", 1)[0].splitlines()
    install, test = readme[0].split(" && ")[0], readme[1].split(" && ")[-1]
    assert (install, test) == ('pip install -e ".[all]"', "python -m pytest -q")
    assert readme[1] == f"apt-get update && apt-get install -y mosquitto && {install} && {test}"
    lines = [line.strip() for line in (root / ".ci" / "run").read_text().splitlines()]
    venv = lines.index('python3 -m venv "$VENV"')
    assert lines.index(". \"$VENV/bin/activate\"") > venv
    assert lines.index(install) > venv and any(line.startswith(test) for line in lines[venv:])
    assert ".venv-ci/" in (root / ".gitignore").read_text().splitlines()


# -- packaging ------------------------------------------------------------------------------------

def docker_context(dest: Path) -> Path:
    """Copy what the coordinator image's build context sends (the repository root filtered by
    coordinator.Dockerfile.dockerignore) to ``dest``. The file is an allow-list, ``*`` then
    ``!top-level-name`` lines, then ``**/pattern`` exclusions; this reads exactly that form."""
    lines = [line.strip() for line in
             (DEPLOY / "compose" / "coordinator.Dockerfile.dockerignore").read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert patterns[0] == "*", "the allow-list form starts by excluding everything"
    allowed = [p[1:] for p in patterns[1:] if p.startswith("!")]
    excluded = [p.removeprefix("**/") for p in patterns[1:] if not p.startswith("!")]
    assert all("/" not in name for name in allowed + excluded), patterns
    dest.mkdir(parents=True)
    for name in allowed:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns(*excluded))
        else:
            shutil.copy2(source, dest / name)
    return dest


def test_the_wheel_from_the_image_context_holds_every_package_and_its_data(tmp_path):
    # `pip wheel --no-deps -w dist .` is how a device gets fedsync (README, Install); building it
    # from the Docker context also proves the image's COPY sends everything the build needs.
    context = docker_context(tmp_path / "context")
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path / "dist"),
                    str(context)], check=True, capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - started
    (wheel,) = (tmp_path / "dist").glob("fedsync-*-py3-none-any.whl")  # pure Python: one wheel for every device
    names = set(zipfile.ZipFile(wheel).namelist())

    # the design card's top-level folders install under the fedsync namespace: one top-level name
    installed_as = {"fedsync": "fedsync", "coordinator": "fedsync/coordinator", "device_agent": "fedsync/device_agent",
                    "broker_config": "fedsync/broker_config"}
    expected = {f"{installed_as[pkg]}/{f.relative_to(REPO / pkg)}" for pkg in installed_as
                for f in (REPO / pkg).rglob("*.py") if "__pycache__" not in f.parts}
    assert len(expected) >= 60 and expected - names == set()
    assert {n.split("/")[0] for n in names} == {"fedsync", "fedsync-0.1.0.dist-info"}
    data = {f"fedsync/broker_config/{f.relative_to(REPO / 'broker_config')}" for pattern in ("*.conf", "*.template", "*.yaml")
            for f in (REPO / "broker_config").glob(pattern)}
    assert "fedsync/broker_config/mosquitto.conf.template" in data and data <= names
    assert not {n for n in names if n.split("/")[0] in ("tests", "benchmarks", "deploy", "docs")}
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/entry_points.txt")))
    assert b"fedsync = fedsync.cli:main" in entry_points
    assert seconds < 120, f"building the wheel took {seconds:.0f} s"


def index_installs(line: str) -> list[str]:
    """The arguments of each ``pip install`` on ``line`` that name fedsync as a bare requirement
    (``fedsync``, ``"fedsync[coordinator]"``, ``fedsync==0.1.0``): those come from PyPI. A wheel,
    a directory or ``fedsync @ git+...`` is not one."""
    found = []
    for tail in re.split(r"\bpip3? install\b", line)[1:]:
        command = re.split(r"`|&&|\|\||;|\||#", tail, maxsplit=1)[0]
        try:
            words = shlex.split(command)
        except ValueError:
            words = command.split()
        found += [w for w in words if not w.startswith("-") and "@" not in w
                  and re.fullmatch(r"fedsync(\[[\w,-]*\])?([=<>!~]=?\S*)?", w)]
    return found


def test_nothing_tells_a_user_to_install_fedsync_from_pypi_before_it_is_published():
    files = [REPO / "README.md", *(f for f in DEPLOY.rglob("*") if f.is_file())]
    offending = []
    for path in files:
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if index_installs(line) and "once published" not in line:
                offending.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert offending == []
    # The checker itself, on the forms it must tell apart.
    assert index_installs('pip install "fedsync[coordinator]" && x') == ["fedsync[coordinator]"]
    assert index_installs("/opt/fedsync/venv/bin/pip install --quiet fedsync==0.1.0") == ["fedsync==0.1.0"]
    assert index_installs('pip install "fedsync @ git+https://<your-git-host>/fedsync.git"') == []
    assert index_installs("pip install ./fedsync-0.1.0-py3-none-any.whl ./fedsync") == []


# -- compose -----------------------------------------------------------------------------------------

def test_compose_file_has_mosquitto_and_a_coordinator_with_a_valid_config():
    from fedsync.coordinator.config import CoordinatorConfig
    from fedsync.cli import build_parser

    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = doc["services"]
    assert {"mosquitto", "coordinator"} <= set(services)
    assert services["mosquitto"]["image"].startswith("eclipse-mosquitto:2")
    build = services["coordinator"]["build"]
    # The image installs this checkout: the context is the repository root, not deploy/compose.
    assert (DEPLOY / build["context"]).resolve() == REPO
    dockerfile = REPO / build["dockerfile"]
    text = dockerfile.read_text()
    assert re.search(r"^FROM python:3\.1[1-9]", text, re.M)
    assert re.search(r"^COPY \. /src$", text, re.M) and "pip wheel --no-cache-dir --no-deps -w /dist /src" in text
    assert set(build["args"]) <= set(re.findall(r"^ARG (\w+)=", text, re.M))
    assert Path(f"{dockerfile}.dockerignore").exists()
    build_parser().parse_args(services["coordinator"]["command"])  # flags the CLI knows
    mounts = {m.split(":")[1]: m.split(":")[0] for m in services["coordinator"]["volumes"]}
    cfg = load_config(CoordinatorConfig, DEPLOY / mounts["/etc/fedsync/coordinator.toml"],
                      check_files=False)  # the paths inside the container
    # The config names files exactly where compose mounts them.
    assert {cfg.broker.password_file, cfg.broker.ca_file} <= set(mounts)
    assert cfg.broker.url.startswith("mqtts://mosquitto:")
    assert services["coordinator"]["depends_on"]["mosquitto"]["condition"] == "service_healthy"
    for m in [*services["mosquitto"]["volumes"], *services["coordinator"]["volumes"]]:
        source = m.split(":")[0]
        if source.startswith("./compose/"):
            assert (DEPLOY / source).exists(), source  # files we ship; ./broker/ is rendered by the operator


def test_emqx_cluster_example_has_three_nodes_with_the_same_seeds_and_config():
    here = DEPLOY / "cluster" / "emqx"
    doc = yaml.safe_load((here / "compose.yaml").read_text())
    nodes = {k: v for k, v in doc["services"].items() if k.startswith("emqx")}
    assert len(nodes) == 3
    names = {v["environment"]["EMQX_NODE__NAME"] for v in nodes.values()}
    conf = (here / "emqx.conf").read_text()
    seeds = set(re.findall(r'"(emqx@[^"]+)"', conf.split("static.seeds", 1)[1].split("\n", 1)[0]))
    assert names == seeds and len(names) == 3
    for v in nodes.values():
        for m in v["volumes"]:
            assert (here / m.split(":")[0]).exists() or m.startswith(("./users.csv", "./certs")), m
    assert conf.count("{") == conf.count("}")
    assert "hash_clientid" in conf and 'max_packet_size = "8MB"' in conf
    acl = (here / "acl.conf").read_text()
    rules = [line for line in acl.splitlines() if line.strip() and not line.startswith("%%")]
    assert all(r.startswith("{") and r.endswith("}.") for r in rules), rules
    assert rules[-1] == "{deny, all}."


# -- the edge/root bridge, for real ---------------------------------------------------------------------

def bridge_edge_config(port: int, root_port: int, password: str, workdir: Path) -> str:
    """deploy/cluster/mosquitto-bridge/edge.conf's bridge section, on loopback without TLS."""
    text = (DEPLOY / "cluster" / "mosquitto-bridge" / "edge.conf").read_text()
    bridge = text.split("# --- bridge to the root broker ---", 1)[1]
    bridge = re.sub(r"^address .*$", f"address 127.0.0.1:{root_port}", bridge, flags=re.M)
    bridge = re.sub(r"^remote_password .*$", f"remote_password {password}", bridge, flags=re.M)
    bridge = re.sub(r"^bridge_(cafile|insecure) .*\n", "", bridge, flags=re.M)
    return (f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {workdir}/passwd\n"
            f"acl_file {workdir}/acl\npersistence true\npersistence_location {workdir}/data/\n"
            f"max_packet_size 8388608\nmax_queued_messages 100000\nlog_dest stderr\nuser root\n{bridge}")


@pytest.mark.broker
def test_a_federation_runs_across_an_edge_to_root_bridge():
    """Coordinator on the root, 3 devices on the edge, both ACLs enforced: 2 rounds commit, a
    device killed at the edge is offline at the root, and the edge holds the retained manifest."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from fedsync.broker_config.acl import mosquitto_acl
    from fedsync.broker_config.process import BrokerProcess, free_port, mosquitto_available, write_mosquitto_password_file
    from fedsync.coordinator.core import RoundPolicy
    from fedsync.lab.federation import LocalFederation
    from fedsync.messages import RoundManifest, decode

    if not mosquitto_available():
        pytest.skip("mosquitto is not installed")
    devices = ["dev-0", "dev-1", "dev-2"]
    users = {"coordinator": "coordinator-pw", "edge-farm1": "edge-pw", **{d: f"{d}-pw" for d in devices}}
    work = Path(tempfile.mkdtemp(prefix="fedsync-bridge-"))  # not tmp_path: mosquitto must traverse it
    root = edge = fed = None
    try:
        (work / "root.acl").write_text(mosquitto_acl("farm", []) + "\n"
                                       + (DEPLOY / "cluster/mosquitto-bridge/root-acl.conf").read_text())
        root = BrokerProcess("mosquitto", users={u: users[u] for u in ("coordinator", "edge-farm1")},
                             acl_file=str(work / "root.acl"))
        root.start()
        edge_dir = work / "edge"
        (edge_dir / "data").mkdir(parents=True)
        write_mosquitto_password_file(edge_dir / "passwd", {d: users[d] for d in devices})
        (edge_dir / "acl").write_text(mosquitto_acl("farm", devices))
        (edge_dir / "mosquitto.conf").write_text(bridge_edge_config(free_port(), root.port, users["edge-farm1"],
                                                                    edge_dir))
        edge = BrokerProcess.from_config_dir(edge_dir)
        edge.start()

        fed = LocalFederation(edge.url, users, n_devices=3, seed=1, federation="farm", coordinator_url=root.url,
                              policy=RoundPolicy(rounds=2, target=3, quorum=2, min_devices=3, round_timeout=60.0))
        fed.start()
        assert fed.wait(60), "rounds did not commit across the bridge"
        fed.kill_device("dev-2")  # socket dropped at the edge: the edge fires the will

        def counts(core) -> tuple[int, int, int, int]:
            st = core.stats
            return st.rounds_committed, st.updates_accepted, st.shards_rejected, st.devices_offline_detected

        wait_until(lambda: on_service_thread(fed.coordinator, counts)[3] == 1, 15, "dev-2's will at the root")
        seen = on_service_thread(fed.coordinator, counts)

        def late_read() -> list[tuple[bool, bytes]]:
            """What a device that connects to the edge now is handed on the manifest topic."""
            got: list[tuple[bool, bytes]] = []
            arrived = threading.Event()
            late = paho.Client(CallbackAPIVersion.VERSION2, client_id="dev-1-late", clean_session=True)
            late.username_pw_set("dev-1", users["dev-1"])
            late.on_connect = lambda c, u, f, rc, p: c.subscribe(fed.topics.manifest, 1)
            late.on_message = lambda c, u, m: (got.append((m.retain, bytes(m.payload))), arrived.set())
            late.connect(edge.host, edge.port, 15)
            late.loop_start()
            arrived.wait(10)
            late.loop_stop()
            late.disconnect()
            return got

        # The finished manifest goes root -> edge while dev-2's will went edge -> root: the two
        # directions are not ordered, so a loaded machine may show the last open one for a moment.
        wait_until(lambda: (read := late_read()) and read[0][0]
                   and decode(read[0][1], RoundManifest).state == "finished", 15,
                   "the finished manifest retained at the edge")
        got = late_read()
    finally:
        if fed is not None:
            fed.stop()
        for broker in (edge, root):
            if broker is not None:
                broker.stop()
        shutil.rmtree(work, ignore_errors=True)

    assert seen == (2, 6, 0, 1)  # committed, accepted, rejected, offline (dev-2's will, via the bridge)
    assert got, "the edge holds no retained manifest"
    retained, payload = got[0]
    assert retained and decode(payload, RoundManifest).state == "finished"
