"""A managed MQTT broker subprocess on 127.0.0.1, for tests, the demo and benchmarks.

Theory of operation
-------------------
``BrokerProcess`` owns one broker process (amqtt via ``python -m
fedsync.broker_config.embedded``, or mosquitto with a generated config) and one working
directory holding everything that process reads or writes::

    workdir/
        broker.log          the broker's stdout+stderr, appended across restarts
        amqtt.passwd        amqtt users (username:argon2id-hash)      [amqtt]
        mosquitto.conf      rendered from mosquitto.conf.template     [mosquitto]
        mosquitto.passwd    mosquitto users (mosquitto_passwd -U)     [mosquitto]
        mosquitto.acl       copy of the ACL file passed in            [mosquitto]
        data/               mosquitto persistence                     [mosquitto]

With ``federation_acl="demo"`` the broker also enforces the fedsync topic ACL for the
given users (``fedsync.broker_config.acl``: mosquitto via an ``acl_file``, amqtt via the plugins
in ``fedsync.broker_config.amqtt_auth``). ``BrokerProcess.from_config_dir(dir)`` instead runs
mosquitto with exactly the configuration ``fedsync broker-config`` rendered into ``dir``
(TLS listener included; ``url`` is then ``mqtts://``); nothing is generated or rewritten.

The port is chosen once, in the constructor, and the working directory once, at the
first ``start``; ``restart`` and ``start`` after ``kill`` reuse both, so clients
reconnect to the same URL and mosquitto finds its persisted retained messages and
sessions. ``stop`` ends the process and removes a working directory it created itself.

Readiness is "the broker printed its ready line and the port accepts connections" (a
TCP connect, which a TLS listener accepts before any handshake); a
process that exits or is not ready within ``start_timeout`` raises ``RuntimeError``
carrying the tail of its log.

mosquitto started as root drops to the ``mosquitto`` user *before* it opens the password
file, the ACL file and the persistence directory (measured with 2.0.11), so those are
chowned to ``mosquitto``. If that user cannot even traverse to the working directory
(for example a pytest ``tmp_path`` under a 0700 directory), the config says ``user root``
instead and the broker keeps root's privileges: acceptable on loopback in a test, and
never what the rendered production config does.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Literal

from fedsync.atomic import write_atomic
from fedsync.broker_config.acl import RESERVED_USERS, amqtt_acl, mosquitto_acl
# Re-exported: tests, the lab and benchmarks import these from here with BrokerProcess.
from fedsync.broker_config.mosquitto import (can_traverse, find_program, mosquitto_account,  # noqa: F401
                                             mosquitto_available, render_mosquitto_conf,
                                             write_mosquitto_password_file)

BrokerKind = Literal["amqtt", "mosquitto"]

HOST = "127.0.0.1"
LOG_TAIL_LINES = 40
_PROJECT_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    Another process may take it before the broker binds; ``BrokerProcess.start`` then
    fails with the broker's bind error in its message.

    >>> 0 < free_port() < 65536
    True
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@functools.lru_cache(maxsize=8)
def _amqtt_password_text(users: tuple[tuple[str, str], ...]) -> str:
    # Argon2 hashing costs ~50 ms per user; tests start a broker per test with the same
    # 33 users, so the salted hashes are computed once per process and reused.
    from fedsync.broker_config.embedded import format_password_file

    return format_password_file(dict(users))


class BrokerProcess:
    """A broker subprocess on 127.0.0.1 that a test, the demo or a benchmark controls.

    >>> with BrokerProcess("amqtt", users={"coordinator": "pw"}) as broker:  # doctest: +SKIP
    ...     client.username_pw_set("coordinator", "pw")
    ...     client.connect(broker.host, broker.port)
    """

    def __init__(
        self,
        kind: BrokerKind,
        port: int | None = None,
        users: Mapping[str, str] | None = None,
        workdir: str | os.PathLike[str] | None = None,
        acl_file: str | None = None,
        *,
        federation_acl: str | None = None,
        config_file: str | os.PathLike[str] | None = None,
        start_timeout: float = 15.0,
        stop_timeout: float = 10.0,
    ) -> None:
        if kind not in ("amqtt", "mosquitto"):
            raise ValueError(f"kind must be 'amqtt' or 'mosquitto', got {kind!r}")
        if acl_file is not None and kind != "mosquitto":
            # amqtt's ACL plugin does not stop retained messages reaching non-subscribers
            # (docs/brokers.md), so accepting an ACL file here would promise isolation it cannot
            # give; federation_acl enables what amqtt can enforce (docs/security.md).
            raise ValueError("acl_file is supported for mosquitto only")
        if federation_acl is not None and (acl_file is not None or not users):
            raise ValueError("federation_acl needs users and excludes acl_file")
        self._tls = False
        if config_file is not None:
            if kind != "mosquitto" or users or acl_file or federation_acl:
                raise ValueError("config_file is a complete mosquitto configuration: no users or ACL options")
            port, self._tls = _listener_of(Path(config_file), port)
        self.kind: BrokerKind = kind
        self._config_file = Path(config_file).resolve() if config_file is not None else None
        self._federation_acl = federation_acl
        self._port = port if port is not None else free_port()
        self._users = dict(users) if users else None
        self._acl_source = acl_file
        self._given_workdir = workdir
        self._workdir: Path | None = Path(workdir) if workdir else None
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._finalizer: weakref.finalize | None = None

    # -- addresses -------------------------------------------------------------------

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"{'mqtts' if self._tls else 'mqtt'}://{HOST}:{self._port}"

    @classmethod
    def from_config_dir(cls, config_dir: str | os.PathLike[str], **kwargs) -> BrokerProcess:
        """A mosquitto running exactly ``config_dir/mosquitto.conf`` (``fedsync broker-config``).

        The port and TLS come from the config's first ``listener``, which must bind
        127.0.0.1 (render with ``--bind 127.0.0.1``). The directory is the working
        directory: ``stop`` leaves it in place, and the broker log goes to
        ``config_dir/broker.log``. Nothing in it is rewritten, so the files must already
        be readable by the account mosquitto drops to (the renderer sees to that).

        >>> broker = BrokerProcess.from_config_dir("/tmp/fedsync-broker")  # doctest: +SKIP
        >>> broker.url  # doctest: +SKIP
        'mqtts://127.0.0.1:8883'
        """
        config_dir = Path(config_dir)
        return cls("mosquitto", workdir=config_dir, config_file=config_dir / "mosquitto.conf", **kwargs)

    @property
    def workdir(self) -> Path | None:
        return self._workdir

    @property
    def log_path(self) -> Path | None:
        return self._workdir / "broker.log" if self._workdir else None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the broker and wait until it accepts connections (RuntimeError if not)."""
        if self.is_running():
            raise RuntimeError(f"{self.kind} broker on port {self._port} is already running")
        self._reap()
        fresh_tempdir = self._workdir is None
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix=f"fedsync-{self.kind}-"))
        self._workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._spawn()
        except BaseException:
            self._terminate(graceful=False)
            if fresh_tempdir:
                # Nothing worth keeping yet; the error message carries the log tail.
                shutil.rmtree(self._workdir, ignore_errors=True)
                self._workdir = None
            raise

    def stop(self) -> None:
        """SIGTERM the broker (SIGKILL after stop_timeout), reap it, remove a temp workdir."""
        self._terminate(graceful=True)
        if self._given_workdir is None and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def kill(self) -> None:
        """SIGKILL the broker (a crash, for fault tests); ``start`` brings it back."""
        self._terminate(graceful=False)

    def restart(self) -> None:
        """Stop the broker cleanly and start it again on the same port and workdir."""
        self._terminate(graceful=True)
        self.start()

    def __enter__(self) -> BrokerProcess:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"BrokerProcess({self.kind!r}, port={self._port}, {state})"

    # -- internals -------------------------------------------------------------------

    def _spawn(self) -> None:
        assert self._workdir is not None
        argv, ready_marker = self._prepare_amqtt() if self.kind == "amqtt" else self._prepare_mosquitto()
        log_path = self._workdir / "broker.log"
        log_offset = log_path.stat().st_size if log_path.exists() else 0
        self._log = open(log_path, "ab")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PROJECT_ROOT), env.get("PYTHONPATH")]))
        self._proc = subprocess.Popen(
            argv, cwd=self._workdir, env=env, stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT,
            # Its own session: a Ctrl-C meant for the test runner must not kill the broker
            # behind BrokerProcess's back; stop() ends it deliberately.
            start_new_session=True,
        )
        # Last resort if the owner forgets stop(): kill the broker at interpreter exit.
        self._finalizer = weakref.finalize(self, _kill_quietly, self._proc)
        self._wait_ready(log_path, log_offset, ready_marker)

    def _prepare_amqtt(self) -> tuple[list[str], bytes]:
        assert self._workdir is not None
        module = "fedsync.broker_config.amqtt_auth" if self._federation_acl else "fedsync.broker_config.embedded"
        argv = [sys.executable, "-m", module, "--host", HOST, "--port", str(self._port)]
        if self._users:
            passwd = self._workdir / "amqtt.passwd"
            write_atomic(passwd, _amqtt_password_text(tuple(sorted(self._users.items()))), mode=0o600)
            argv += ["--password-file", str(passwd)]
        if self._federation_acl:
            devices = [u for u in self._users or {} if u not in RESERVED_USERS]
            acl = self._workdir / "amqtt-acl.json"
            write_atomic(acl, json.dumps(amqtt_acl(self._federation_acl, devices), indent=1))
            argv += ["--acl-file", str(acl)]
        return argv, b"broker_ready"

    def _prepare_mosquitto(self) -> tuple[list[str], bytes]:
        assert self._workdir is not None
        program = find_program("mosquitto")
        if program is None:
            raise RuntimeError("mosquitto not found; install the mosquitto package or use kind='amqtt'")
        if self._config_file is not None:
            return [program, "-c", str(self._config_file)], b" running"
        data_dir = self._workdir / "data"
        data_dir.mkdir(exist_ok=True)
        passwd = acl = None
        if self._users:
            passwd = self._workdir / "mosquitto.passwd"
            write_mosquitto_password_file(passwd, self._users)
        if self._acl_source:
            # A copy inside workdir: re-read on every (re)start and reachable by the
            # mosquitto user wherever the original lives.
            acl = self._workdir / "mosquitto.acl"
            shutil.copyfile(self._acl_source, acl)
            os.chmod(acl, 0o600)
        elif self._federation_acl:
            acl = self._workdir / "mosquitto.acl"
            devices = [u for u in self._users or {} if u not in RESERVED_USERS]
            write_atomic(acl, mosquitto_acl(self._federation_acl, devices), mode=0o600)

        user = None
        ids = mosquitto_account() if os.geteuid() == 0 else None
        if ids is not None:
            uid, gid, gids = ids
            if self._given_workdir is None:
                os.chown(self._workdir, uid, gid)  # our own temp dir (mode 0700)
            if can_traverse(self._workdir, uid, gids):
                for path in (data_dir, *data_dir.iterdir(), passwd, acl):
                    if path is not None:
                        os.chown(path, uid, gid)
            else:
                user = "root"
        conf = self._workdir / "mosquitto.conf"
        write_atomic(conf, render_mosquitto_conf(
            self._port, str(data_dir), str(passwd) if passwd else None, str(acl) if acl else None,
            user=user))
        return [program, "-c", str(conf)], b" running"

    def _wait_ready(self, log_path: Path, log_offset: int, marker: bytes) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self._start_timeout
        seen_marker = False
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"{self.kind} broker exited with status {self._proc.returncode} while starting "
                    f"on {HOST}:{self._port}; log tail:\n{self._log_tail(log_path)}")
            if not seen_marker:
                with open(log_path, "rb") as f:
                    f.seek(log_offset)
                    seen_marker = marker in f.read()
            # amqtt logs an error for a connection that sends no CONNECT, so it is not
            # probed: its ready line is printed only after the listener is bound.
            if seen_marker and (self.kind == "amqtt" or _port_accepts(self._port)):
                return
            time.sleep(0.05)
        raise RuntimeError(
            f"{self.kind} broker did not accept connections on {HOST}:{self._port} within "
            f"{self._start_timeout:.0f} s; log tail:\n{self._log_tail(log_path)}")

    def _terminate(self, *, graceful: bool) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            if graceful:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=self._stop_timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
            else:
                proc.kill()
        self._reap()

    def _reap(self) -> None:
        if self._proc is not None:
            self._proc.wait()
            self._proc = None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._log is not None:
            self._log.close()
            self._log = None

    @staticmethod
    def _log_tail(log_path: Path) -> str:
        try:
            lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError as exc:
            return f"(log unreadable: {exc})"
        return "\n".join(lines[-LOG_TAIL_LINES:]) or "(log empty)"


def _listener_of(config_file: Path, port: int | None) -> tuple[int, bool]:
    """(port, tls) of the first ``listener`` in a mosquitto config; it must bind 127.0.0.1."""
    listener: list[str] | None = None
    tls = False
    for raw in config_file.read_text(encoding="utf-8").splitlines():
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        if words[0] == "listener":
            if listener is not None:
                break  # settings after the second listener belong to that one
            listener = words
        elif listener is not None and words[0] in ("certfile", "keyfile"):
            tls = True
    if listener is None or len(listener) < 2 or not listener[1].isdigit():
        raise ValueError(f"{config_file}: no 'listener PORT ADDRESS' line")
    if len(listener) < 3 or listener[2] != HOST:
        # BrokerProcess runs loopback brokers only (tests, demo): never expose one.
        raise ValueError(f"{config_file}: first listener must bind {HOST} (render with --bind {HOST})")
    found = int(listener[1])
    if port is not None and port != found:
        raise ValueError(f"{config_file}: listener port is {found}, not {port}")
    return found, tls


def _port_accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


def _kill_quietly(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
