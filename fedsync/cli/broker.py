"""``fedsync broker`` (the embedded amqtt broker) and ``fedsync broker-config`` (a mosquitto setup)."""

from __future__ import annotations

import argparse
import logging

from fedsync.cli.common import log
from fedsync.log import configure, log_event


def add_broker(sub) -> None:
    p = sub.add_parser("broker", help="run the embedded amqtt broker (demos and labs; mosquitto in the field)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=1883, help="TCP port to listen on (default: %(default)s)")
    p.add_argument("--users", metavar="FILE",
                   help="file of 'name:password' lines (default: none, anyone who reaches the port may log in)")
    p.add_argument("--acl-federation", metavar="NAME", help="with --users: enforce the fedsync topic ACL for this "
                   "federation; every user but 'coordinator' and 'monitor' is a device, whose client id must equal "
                   "its user name (default: none, no ACL)")


def add_broker_config(sub) -> None:
    # Listed in `fedsync --help` only: main() hands the arguments to the renderer's own parser.
    p = sub.add_parser("broker-config", help="render a ready mosquitto setup (TLS, passwords, ACL)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)


def cmd_broker(a: argparse.Namespace) -> int:
    import tempfile

    from fedsync.broker_config.embedded import read_users_file, run_embedded, write_password_file

    configure("info")
    if a.users is None:
        log_event(log, "anonymous_broker", logging.WARNING, note="no --users: anyone who reaches the port may connect")
        run_embedded(a.host, a.port, None)
        return 0
    users = read_users_file(a.users)
    with tempfile.TemporaryDirectory() as d:
        write_password_file(f"{d}/passwd", users)
        acl = None
        if a.acl_federation:
            from fedsync.broker_config.acl import amqtt_acl

            acl = amqtt_acl(a.acl_federation, sorted(u for u in users if u not in ("coordinator", "monitor")))
        run_embedded(a.host, a.port, f"{d}/passwd", acl)
    return 0


def broker_config_argv(rest: list[str]) -> int:
    """``fedsync broker-config ...``: the renderer parses its own arguments, ``-h`` included."""
    from fedsync.broker_config.render import main as render_main

    return render_main(rest)
