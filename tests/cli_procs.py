"""Separate ``fedsync`` and ``mosquitto`` processes for the CLI acceptance test.

Theory of operation
-------------------
A :class:`Fleet` starts every process of a scenario with ``subprocess.Popen``, each with
its stderr in its own file under the test's ``tmp_path`` (``{role}.{n}.log``: ``n`` counts
the starts of one role, so a restarted process gets a fresh log and its lines are counted
per process). What a process did is read back from that file only: the services log
``time LEVEL logger event k=v ...`` (``fedsync/log.py``), which :func:`parse_line` turns
into a :class:`LogLine`.

Every step of a scenario runs inside ``fleet.phase(name, roles...)``: an assertion or a
timeout in it fails the test with the phase's name and the tail of the named roles' logs,
so a failure says which promise broke and shows the lines that tell why. Waiting is
:meth:`Fleet.wait_for`, a poll with a deadline that also gives up at once when a process
it depends on has exited. ``stop_all`` (the fixture's finalizer) ends every process still
running, by its PID, pass or fail.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedsync.broker_config.mosquitto import find_program
from tests.util import stop_process, wait_until

FEDSYNC = os.path.join(os.path.dirname(sys.executable), "fedsync")  # the console script of this venv
MOSQUITTO = find_program("mosquitto")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')
TAIL_LINES = 20


@dataclass(frozen=True, slots=True)
class LogLine:
    """One structured log line: ``2026-11-25 10:52:09,123 INFO fedsync.coordinator round_committed round=1 ...``."""

    level: str
    logger: str
    event: str
    fields: dict[str, str]

    def int(self, key: str) -> int:
        return int(self.fields[key])


def parse_line(line: str) -> LogLine | None:
    """The structured line, or None for anything else (a traceback, the CLI's one-line errors).

    >>> parse_line('2026-11-25 10:52:09,123 INFO fedsync.agent round_done round=3 reason="round closed"').fields
    {'round': '3', 'reason': 'round closed'}
    """
    parts = line.rstrip("\n").split(" ", 5)
    if len(parts) < 5 or parts[2] not in LEVELS:
        return None
    fields = {}
    for key, value in _FIELD.findall(parts[5] if len(parts) > 5 else ""):
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        fields[key] = value
    return LogLine(parts[2], parts[3], parts[4], fields)


class CliProcess:
    """One started command: its Popen, its stderr file and what it logged."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name, self.argv, self.log, self.cwd = name, argv, log, cwd
        self.out = log.with_suffix(".out")
        with log.open("wb") as err, self.out.open("wb") as out:
            # Its own session: a Ctrl-C of the test runner reaches only pytest, whose
            # finalizer then stops this process deliberately, by its PID.
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                                         cwd=cwd, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def lines(self) -> list[str]:
        return self.text().splitlines()

    def events(self, event: str, **match: object) -> list[LogLine]:
        """Every structured line of ``event`` whose fields equal ``match`` (compared as text)."""
        want = {k: str(v) for k, v in match.items()}
        out = []
        for line in self.lines():
            parsed = parse_line(line)
            if parsed is not None and parsed.event == event and all(parsed.fields.get(k) == v for k, v in want.items()):
                out.append(parsed)
        return out

    def tail(self, n: int = TAIL_LINES) -> str:
        return "\n".join(self.lines()[-n:])

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)  # a no-op once the process has been reaped

    def wait(self, timeout: float) -> int:
        """The exit code (negative: the signal that ended it); AssertionError after ``timeout``."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} (pid {self.pid}) still running after {timeout}s") from None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; reaps the process."""
        stop_process(self.proc, grace)

    def describe(self) -> str:
        code = self.proc.poll()
        return f"{self.name} (pid {self.pid}, {'running' if code is None else f'exit {code}'}, {self.log})"


class Fleet:
    """Every process a scenario started, in start order."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[CliProcess] = []

    def start(self, role: str, argv: list[str], cwd: Path | None = None) -> CliProcess:
        n = 1 + sum(p.name.rsplit(".", 1)[0] == role for p in self.procs)
        p = CliProcess(f"{role}.{n}", argv, self.log_dir / f"{role}.{n}.log",
                       env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=cwd)
        self.procs.append(p)
        return p

    def restart(self, old: CliProcess) -> CliProcess:
        """The same command again (``old`` must have exited)."""
        assert not old.alive(), f"{old.describe()} is still running"
        return self.start(old.name.rsplit(".", 1)[0], old.argv, old.cwd)

    def of(self, role: str) -> list[CliProcess]:
        """Every process started for ``role``, oldest first."""
        return [p for p in self.procs if p.name.rsplit(".", 1)[0] == role]

    def run(self, role: str, argv: list[str], timeout: float = 60.0) -> tuple[int, str, str]:
        """Run a short command to its end: (exit code, stdout, stderr), both kept in files."""
        p = self.start(role, argv)
        code = p.wait(timeout)
        return code, p.out.read_text(errors="replace"), p.text()

    def wait_for(self, what: str, predicate: Callable[[], object], timeout: float,
                 needs: Iterable[CliProcess] = ()) -> None:
        """Poll ``predicate`` until true; fail after ``timeout``, or at once if one of ``needs`` has exited."""
        needs = list(needs)

        def check() -> bool:
            if predicate():
                return True
            for p in needs:
                if not p.alive():
                    raise AssertionError(f"{p.describe()} exited while waiting for {what}")
            return False

        wait_until(check, timeout, what)

    @contextlib.contextmanager
    def phase(self, name: str, *roles: str) -> Iterator[None]:
        """Run a step; a failure in it names the phase and shows the tails of ``roles``' logs (all if none)."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - any failure of the step is reported as the phase's failure
            raise AssertionError(f"phase {name!r} failed: {exc}\n{self.tails(roles)}") from exc

    def tails(self, roles: Iterable[str] = ()) -> str:
        roles = tuple(roles)
        chosen = [p for p in self.procs if not roles or p.name.rsplit(".", 1)[0].startswith(roles)]
        return "\n".join(f"--- {p.describe()} ---\n{p.tail()}" for p in chosen)

    def stop_all(self) -> None:
        """End every process still running: clients first, the broker last."""
        running = [p for p in self.procs if p.alive()]
        brokers = [p for p in running if p.argv[:1] == [MOSQUITTO]]
        for group in ([p for p in running if p not in brokers], brokers):
            for p in group:
                p.signal(signal.SIGCONT)
                p.signal(signal.SIGTERM)
            for p in group:
                p.stop()


# -- fixtures for the CLI-process tests (import them into the test module: `from tests.cli_procs
# import broker_dir, fleet`) ------------------------------------------------------------------


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """A Fleet in the test's tmp dir; every process it started is stopped afterwards."""
    f = Fleet(tmp_path)
    try:
        yield f
    finally:
        f.stop_all()


@pytest.fixture
def broker_dir() -> Iterator[Path]:
    """A directory for a rendered mosquitto setup. Not under tmp_path: mosquitto started as root
    drops to the `mosquitto` user, which must reach its files, and pytest's base temp dir is 0700
    (the renderer makes this dir 0755)."""
    d = Path(tempfile.mkdtemp(prefix="fedsync-broker-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
