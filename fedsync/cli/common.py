"""What the service commands share: the broker flags, their config overrides, the wait for a signal.

Every command logs as ``fedsync.cli`` (one logger for the whole command line, as before the split).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from fedsync.log import LOG_LEVELS

log = logging.getLogger("fedsync.cli")


def broker_flags(p: argparse.ArgumentParser, user: str, log_level: str = "from config, info") -> None:
    p.add_argument("--broker", metavar="URL", help="mqtt://HOST:PORT, or mqtts://HOST:PORT for TLS "
                   "(default: from config, mqtt://127.0.0.1:1883)")
    p.add_argument("--username", help=f"broker user name (default: {user})")
    p.add_argument("--password-file", metavar="FILE",
                   help="file whose first line is the broker password (default: from config, none)")
    p.add_argument("--ca-file", metavar="FILE", help="CA bundle that verifies the broker's TLS certificate "
                   "(default: from config, none: the system's CAs)")
    p.add_argument("--config", metavar="FILE", help="TOML config file (default: none, every key at its default)")
    p.add_argument("--log-level", choices=LOG_LEVELS, help=f"debug also shows tracebacks (default: {log_level})")


def broker_overrides(a: argparse.Namespace) -> dict:
    """The ``[broker]`` keys the broker flags override (None: keep the file's value)."""
    return {"broker.url": a.broker, "broker.username": a.username,
            "broker.password_file": a.password_file, "broker.ca_file": a.ca_file}


def wait_for_signal(stop: threading.Event) -> None:
    """Block until ``stop`` is set, by the service or by SIGINT / SIGTERM."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
