"""The ``fedsync`` command line (argparse: the device install stays small).

One module per service, each with its sub-commands' flags and handlers:
:mod:`~fedsync.cli.broker` (broker, broker-config), :mod:`~fedsync.cli.coordinator`
(coordinator, status), :mod:`~fedsync.cli.agent` (agent) and :mod:`~fedsync.cli.lab`
(demo, fieldtest, chaos, audit, new). This module builds the parser and runs a command. Each
service reads one TOML file (``--config``); flags override it. Passwords come from
files, never from the command line. Services are imported inside the handlers, so
``fedsync --help`` and a device's ``fedsync agent`` import only what they use.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from fedsync.cli import agent, broker, coordinator, lab
from fedsync.cli.coordinator import _StatusConfig  # noqa: F401 - tests check its config table
from fedsync.cli.lab import CHAOS_PROFILES  # noqa: F401 - tests check it against fedsync.lab.chaos
from fedsync.config import ConfigError
from fedsync.errors import OperatorError


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedsync")
    except PackageNotFoundError:  # a checkout on sys.path that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsync", description="Federated-learning parameter sync over MQTT.")
    parser.add_argument("--version", action="version", version=f"fedsync {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    broker.add_broker(sub)
    broker.add_broker_config(sub)
    coordinator.add_coordinator(sub)
    agent.add_agent(sub)
    coordinator.add_status(sub)
    lab.add_chaos(sub)
    lab.add_fieldtest(sub)
    lab.add_demo(sub)
    lab.add_new(sub)
    lab.add_audit(sub)
    return parser


# Commands that parse their own arguments, -h included (the parser above only lists them).
_ARGV_COMMANDS = {"broker-config": broker.broker_config_argv, "chaos": lab.chaos_argv}
_COMMANDS = {"broker": broker.cmd_broker, "coordinator": coordinator.cmd_coordinator, "agent": agent.cmd_agent,
             "status": coordinator.cmd_status, "fieldtest": lab.cmd_fieldtest, "demo": lab.cmd_demo,
             "audit": lab.cmd_audit, "new": lab.cmd_new}


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit codes: 0 done, 1 trouble at run time, 2 a config or usage error, 130 Ctrl-C.

    A mistake of the operator's is one line per problem on stderr, ``fedsync <command>: ...``;
    the traceback only with ``--log-level debug``.
    """
    try:
        code = _run(sys.argv[1:] if argv is None else argv)
        sys.stdout.flush()  # a reader that went away (| head) shows up here, not at interpreter exit
        return code
    except BrokenPipeError:
        # The Python docs' recipe (signal module, "Note on SIGPIPE"): what is still buffered goes to
        # devnull, so the flush at exit cannot fail a second time with a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _run(argv: list[str]) -> int:
    if argv[:1] and argv[0] in _ARGV_COMMANDS:
        return _ARGV_COMMANDS[argv[0]](argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed --help, --version or the usage error
        return exc.code if isinstance(exc.code, int) else 0
    command = args.command
    debug = getattr(args, "log_level", None) == "debug"
    try:
        return _COMMANDS[command](args)
    except ConfigError as exc:
        if debug:
            traceback.print_exc()
        for problem in exc.problems:
            print(f"fedsync {command}: config error: {problem}", file=sys.stderr)
        return 2
    except OperatorError as exc:
        if debug:
            traceback.print_exc()
        print(f"fedsync {command}: {exc.message}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
