"""Operator mistakes, made the way an operator makes them: through the installed ``fedsync`` script.

Each scenario names one mistake (a value out of range in the TOML file, a typo in a
flag, a file that is not there, a port already taken, a closed pipe) and asserts the
exact outcome: the exit code, and stderr as the exact line(s) that say which field is
wrong, why, and where the value came from. None of them may show a traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fedsync.broker_config.process import BrokerProcess, mosquitto_available
from fedsync.coordinator.config import CoordinatorConfig
from fedsync.device_agent.config import AgentConfig
from fedsync.cli import CHAOS_PROFILES, _StatusConfig, build_parser
from fedsync.codecs import dense, lossy
from fedsync.config import ConfigError, load_config
from tests.util import stop_process

FEDSYNC = os.path.join(os.path.dirname(sys.executable), "fedsync")  # the console script of this venv
TIMEOUT = 30  # seconds; every scenario here ends on its own in well under one


def fedsync(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([FEDSYNC, *args], capture_output=True, text=True, timeout=TIMEOUT)


def config_error(command: str, *problems: str) -> str:
    return "".join(f"fedsync {command}: config error: {p}\n" for p in problems)


@pytest.fixture
def toml(tmp_path: Path):
    def write(text: str) -> str:
        path = tmp_path / "coordinator.toml"
        path.write_text(text)
        return str(path)
    return write


def test_target_zero_in_the_file_names_the_field_the_reason_and_the_file(toml):
    path = toml("[round]\ntarget = 0\n")
    out = fedsync("coordinator", "--config", path)
    assert (out.returncode, out.stderr) == (2, config_error("coordinator", f"round.target: must be >= 1, got 0 ({path})"))


def test_a_misspelt_mode_is_a_problem_not_a_traceback(toml):
    path = toml('[round]\nmode = "asynch"\n')
    out = fedsync("coordinator", "--config", path)
    assert (out.returncode, out.stderr) == (2, config_error(
        "coordinator", f"round.mode: must be one of sync, async, semisync, got 'asynch' ({path})"))


# What a fresh process's registry holds (other tests register extra codecs in this one).
BUILT_IN_CODECS = sorted(c.name for c in (*dense.CODECS, *lossy.CODECS))


def test_an_unknown_codec_lists_the_codecs_the_registry_knows(toml):
    path = toml('[round]\nupdate_codec = "zstdx"\n')
    out = fedsync("coordinator", "--config", path)
    assert (out.returncode, out.stderr) == (2, config_error(
        "coordinator", f"round.update_codec: must be one of {', '.join(BUILT_IN_CODECS)}, got 'zstdx' ({path})"))


def test_two_problems_in_one_file_are_reported_together(toml):
    path = toml("[round]\ntarget = 0\nround_timeout = 0\n\n[broker]\nkeepalive = 2\n")
    out = fedsync("coordinator", "--config", path)
    assert (out.returncode, out.stderr) == (2, config_error(
        "coordinator", f"broker.keepalive: must be >= 5, got 2 ({path})",
        f"round.target: must be >= 1, got 0 ({path})", f"round.round_timeout: must be > 0, got 0.0 ({path})"))


def test_a_flag_overriding_a_good_file_is_blamed_on_the_command_line(toml):
    path = toml("[round]\ntarget = 4\nquorum = 2\n")
    out = fedsync("coordinator", "--config", path, "--quorum", "9")
    assert (out.returncode, out.stderr) == (2, config_error(
        "coordinator", "round.quorum: must be <= round.target (4), got 9 (command line)"))


def test_negative_rounds_on_the_command_line():
    out = fedsync("coordinator", "--rounds", "-3")
    assert (out.returncode, out.stderr) == (2, config_error(
        "coordinator", "round.rounds: must be >= 0, got -3 (command line)"))


def test_a_negative_round_timeout():
    out = fedsync("coordinator", "--round-timeout", "-1")
    assert (out.returncode, out.stderr) == (2, config_error(
        "coordinator", "round.round_timeout: must be > 0, got -1.0 (command line)"))


def test_a_quorum_above_the_target():
    out = fedsync("coordinator", "--quorum", "5", "--target", "2")
    assert (out.returncode, out.stderr) == (2, config_error(
        "coordinator", "round.quorum: must be <= round.target (2), got 5 (command line)"))


def test_an_unknown_log_level_is_refused_by_argparse():
    out = fedsync("coordinator", "--log-level", "verbose")
    assert out.returncode == 2
    lines = out.stderr.splitlines()
    assert lines[0].startswith("usage: fedsync coordinator ")
    assert lines[-1] == ("fedsync coordinator: error: argument --log-level: invalid choice: 'verbose' "
                         "(choose from 'debug', 'info', 'warning', 'error')")
    assert "Traceback" not in out.stderr


def test_a_scheme_typo_in_the_broker_url():
    out = fedsync("coordinator", "--broker", "mqqts://x:1")
    assert (out.returncode, out.stderr) == (2, config_error(
        "coordinator", "broker.url: unsupported scheme 'mqqts' in 'mqqts://x:1' (use mqtt:// or mqtts://) (command line)"))


def test_a_missing_ca_file_names_the_field_and_the_file():
    out = fedsync("agent", "--device-id", "dev-1", "--ca-file", "/nonexistent/ca.pem")
    assert (out.returncode, out.stderr) == (2, config_error(
        "agent", "broker.ca_file: cannot read /nonexistent/ca.pem: No such file or directory (command line)"))


def test_log_level_debug_adds_the_traceback_before_the_same_line():
    out = fedsync("coordinator", "--rounds", "-3", "--log-level", "debug")
    assert out.returncode == 2
    assert out.stderr.startswith("Traceback (most recent call last):\n")
    assert out.stderr.endswith(config_error("coordinator", "round.rounds: must be >= 0, got -3 (command line)"))


def test_agent_data_index_out_of_range():
    out = fedsync("agent", "--device-id", "dev-1", "--data-index", "99")
    assert (out.returncode, out.stderr) == (2, config_error(
        "agent", "data.index: must be < data.num_devices (30), got 99 (command line)"))


def test_status_checks_its_broker_section_too():
    out = fedsync("status", "--broker", "mqtt://127.0.0.1:99999")
    assert (out.returncode, out.stderr) == (2, config_error(
        "status", "broker.url: 'mqtt://127.0.0.1:99999': the port must be a number in 1..65535 (command line)"))


@pytest.mark.parametrize("url, why", [
    ("mqtt://", "'mqtt://' names no host (e.g. mqtt://127.0.0.1:1883)"),
    ("mqtt://:1883", "'mqtt://:1883' names no host (e.g. mqtt://127.0.0.1:1883)"),
    ("mqtt://pi:1883x", "'mqtt://pi:1883x': the port must be a number in 1..65535"),
    ("mqtt://dev-1:secret@pi", "'mqtt://dev-1:secret@pi': no user or password in the URL; use --password-file "
                               "(and [broker] username)"),
    ("mqtts://pi:8883/fedsync", "'mqtts://pi:8883/fedsync': a broker URL is mqtt[s]://host[:port], with no path or query"),
])
def test_a_broker_url_that_would_connect_elsewhere_or_drop_a_part_is_refused(url, why):
    # Before: 'mqtt://' and 'mqtt://:1883' went to 127.0.0.1, and a user, password or path was dropped silently.
    out = fedsync("agent", "--device-id", "dev-1", "--broker", url)
    assert (out.returncode, out.stderr) == (2, config_error("agent", f"broker.url: {why} (command line)"))


def test_a_bare_host_and_port_is_a_plain_mqtt_url():
    from fedsync.address import BrokerAddress

    assert BrokerAddress.parse("10.0.0.5:1884") == BrokerAddress.parse("mqtt://10.0.0.5:1884")
    assert BrokerAddress.parse("10.0.0.5") == BrokerAddress("10.0.0.5", 1883, False)


def test_a_metrics_port_in_use_is_one_line_and_exit_1():
    with socket.socket() as busy, socket.socket() as gone:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        gone.bind(("127.0.0.1", 0))
        broker = gone.getsockname()[1]  # closed at once: the coordinator's background connect is refused
        gone.close()
        port = busy.getsockname()[1]
        proc = subprocess.Popen([FEDSYNC, "coordinator", "--broker", f"mqtt://127.0.0.1:{broker}",
                                 "--metrics-port", str(port), "--log-level", "error"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            stdout, stderr = proc.communicate(timeout=TIMEOUT)
        finally:
            stop_process(proc, sig=signal.SIGKILL)
    assert (proc.returncode, stdout, stderr) == (1, "", f"fedsync coordinator: metrics port {port}: address already in use\n")


def test_version_prints_the_installed_version():
    from importlib.metadata import version

    out = fedsync("--version")
    assert (out.returncode, out.stdout, out.stderr) == (0, f"fedsync {version('fedsync')}\n", "")


def _closed_pipe(*args: str) -> tuple[int, bytes]:
    proc = subprocess.Popen([FEDSYNC, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before fedsync (still importing) writes a byte
    try:
        stderr = proc.stderr.read()
        proc.wait(TIMEOUT)
    finally:
        stop_process(proc, sig=signal.SIGKILL)
    return proc.returncode, stderr


def test_help_into_a_closed_pipe_shows_no_traceback():
    # argparse swallows the OSError of its own write and exits 0 (help was asked for and "given").
    assert _closed_pipe("--help") == (0, b"")


@pytest.mark.broker
@pytest.mark.skipif(not mosquitto_available(), reason="mosquitto not installed")
def test_status_into_a_closed_pipe_exits_1_without_a_traceback():
    with BrokerProcess("mosquitto") as broker:  # anonymous; no retained state: status prints one line
        assert _closed_pipe("status", "--broker", broker.url, "--wait", "0") == (1, b"")


# -- the parser and the check tables, in process ---------------------------------------------------

def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_fieldtest_profiles_are_the_chaos_modules_profiles():
    from fedsync.lab.chaos import PROFILES
    from fedsync.lab.chaos_profiles import SCENARIOS

    assert CHAOS_PROFILES == tuple(PROFILES)
    profile = next(a for a in _subcommands()["fieldtest"]._actions if a.dest == "profile")
    assert tuple(profile.choices) == (*CHAOS_PROFILES, *SCENARIOS)  # link profiles, then the scenarios


def test_every_flag_states_its_default():
    for name, sub in _subcommands().items():
        for action in sub._actions:
            if action.option_strings and action.nargs != 0 and action.dest != "rest":  # not -h or a switch
                assert "default:" in (action.help or ""), (name, action.option_strings)


# Flags whose default lives in a config dataclass: the help must say the same value.
CONFIG_FLAGS = {
    "coordinator": (CoordinatorConfig, {
        "--broker": "broker.url", "--federation": "federation.name", "--rounds": "round.rounds",
        "--target": "round.target", "--quorum": "round.quorum", "--min-devices": "round.min_devices",
        "--round-timeout": "round.round_timeout", "--mode": "round.mode", "--strategy": "strategy.name",
        "--log-level": "coordinator.log_level"}),
    "agent": (AgentConfig, {"--broker": "broker.url", "--federation": "federation.name",
                            "--log-level": "agent.log_level"}),
}


@pytest.mark.parametrize("command", sorted(CONFIG_FLAGS))
def test_flag_help_names_the_config_default(command):
    cls, flags = CONFIG_FLAGS[command]
    actions = {a.option_strings[-1]: a for a in _subcommands()[command]._actions if a.option_strings}
    defaults = cls()
    for flag, dotted in flags.items():
        section, key = dotted.split(".")
        assert f"default: from config, {getattr(getattr(defaults, section), key)})" in actions[flag].help, flag


def test_unknown_keys_and_wrong_types_are_collected_not_raised_on_the_first(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_text('rounds = 3\n[agent]\nresend_afer = 5\ntrain_delay = "slow"\n[dat]\nindex = 1\n')
    with pytest.raises(ConfigError) as err:
        load_config(AgentConfig, path, {"broker.keepalive": True, "data.index": -1})
    assert err.value.problems == [
        f"rounds: a key outside every [section]; sections: broker, federation, agent, data, trainer ({path})",
        f"dat: unknown section; known: broker, federation, agent, data, trainer ({path})",
        "broker.keepalive: expected int, got bool True (command line)",
        "agent.resend_afer: unknown key; known: device_id, resend_after, seed, train_delay, state_dir, "
        f"signing_key_file, signing_scheme, log_level, ledger_dir ({path})",
        f"agent.train_delay: expected float, got str 'slow' ({path})",
        "data.index: must be >= 0, got -1 (command line)",
    ]


def test_a_config_for_another_host_loads_without_the_files_check():
    overrides = {"broker.ca_file": "/nonexistent/ca.pem"}
    assert load_config(AgentConfig, None, overrides, check_files=False).broker.ca_file == "/nonexistent/ca.pem"
    with pytest.raises(ConfigError):
        load_config(AgentConfig, None, overrides)


@pytest.mark.parametrize("cls", [CoordinatorConfig, AgentConfig, _StatusConfig])
def test_every_checked_key_is_a_real_field(cls):
    defaults = cls()
    for dotted in [*cls.checks.fields, *cls.checks.files]:
        section, key = dotted.split(".")
        assert hasattr(getattr(defaults, section), key), dotted


# -- the end-of-run summaries of demo and fieldtest ------------------------------------------------

def test_demo_and_fieldtest_print_their_summary_to_stdout_with_labels_a_person_reads(capsys, tmp_path):
    from fedsync.lab import demo, fieldtest

    fieldtest._print({"summary": {**{key: 3 for key, _ in fieldtest._LABELS}, "final_accuracy": 0.81234,
                                  "profile": "wifi-flaky", "broker": "mosquitto"}}, tmp_path)
    field = capsys.readouterr()
    demo._print_summary({"mode": "sync", "rounds_completed": 2, "rounds_abandoned": 0, "final_accuracy": 0.5,
                         "centralised_accuracy": 0.75, "updates_accepted": 6, "duplicates_dropped": 0,
                         "shards_rejected": 0, "bytes_up": 13616, "bytes_down": 7575, "devices_offline_detected": 0,
                         "wall_seconds": 6.2})
    dem = capsys.readouterr()
    assert field.err == dem.err == ""
    assert "fedsync fieldtest (wifi-flaky, mosquitto)" in field.out
    for line in ("│ Rounds committed ", "│ Final accuracy  ", "│ 0.8123 ", "│ Shards re-sent ", "│ Report "):
        assert line in field.out, line
    assert not any(key in field.out for key, _ in fieldtest._LABELS)  # no raw keys
    assert "fedsync demo (sync)" in dem.out
    for line in ("│ Rounds committed / abandoned ", "│ 2 / 0 ", "│ Final accuracy (federated) ", "│ 0.5000 ",
                 "│ +25.00 ", "│ 13,616 / 7,575 "):
        assert line in dem.out, line


def test_a_trainer_table_without_a_factory_is_refused_and_a_typo_is_named(toml):
    # Before: [trainer] factroy = ... ran the built-in trainer on Synthetic data, with no word said.
    path = toml('[trainer]\nfactroy = "trainer:make_trainer"\ndevices = 10\n')
    out = fedsync("agent", "--config", path, "--device-id", "dev-0")
    assert (out.returncode, out.stderr) == (2, config_error(
        "agent", "trainer.factory: required when [trainer] has keys (devices, factroy); did you mean factory "
                 f"instead of factroy? ({path})"))
    path = toml('[trainer]\ndevices = 10\n')
    out = fedsync("agent", "--config", path, "--device-id", "dev-0")
    assert (out.returncode, out.stderr) == (2, config_error(
        "agent", f"trainer.factory: required when [trainer] has keys (devices) ({path})"))
