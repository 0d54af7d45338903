"""The two baseline receivers of benchmarks/ingest.py: mosquitto's own client and plain paho.

Theory of operation
-------------------
Both receive the same payload bytes the coordinator receives, published the same way (QoS 1,
the same publisher process), on their own topic prefix so that neither sees the other's trial.
Both are in processes of their own, never in the benchmark process that hosts the coordinator.

:class:`NativeSubscriber` is the broker's own limit: ``mosquitto_sub`` (C, libmosquitto;
Debian package mosquitto-clients), QoS 1, with a persistent session (``-c``, a fixed client id)
whose subscription to ``rawnative/#`` is made once, at set-up (``-E``: exit on SUBACK). Per
trial a fresh ``mosquitto_sub -c -C N -F '%l'`` resumes that session (it subscribes again too)
and exits after its N-th message. It acknowledges each PUBLISH and writes only the payload's
length, a few bytes per message, block-buffered into a pipe read here: that is no more work
than writing the payload to /dev/null, and the trial checks that N messages and the expected
bytes arrived. The clock starts once the broker's log says the session is connected (the
session already holds the subscription, so nothing published after that is missed; had it
been earlier, the broker would have queued the messages for the session, not dropped them).
Time: "go" to the process's exit after its N-th message (its DISCONNECT included, well under
a millisecond). CPU: the exited process's rusage (``os.wait4``).

:class:`PahoSubscriber` is a plain paho-mqtt client (its own network thread, QoS 1) in a
spawned child process that imports paho and nothing of fedsync, so
``fedsync.transport.paho_fast`` is never installed in it; the child reports which
``decode_publish`` paho uses, and the benchmark refuses to run if it is not paho's own. It
obeys a pipe: ``("arm", n)`` -> ``("armed",)``; when n messages have arrived it sends
``("done", t_last, count, bytes, cpu)`` (``perf_counter`` is CLOCK_MONOTONIC on Linux, one
clock for every process; cpu = the child's user+sys since arming); ``("quit",)`` ends it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import threading
import time
from pathlib import Path

NATIVE_PREFIX = "rawnative"  # topics not under fedsync/, so no coordinator session queues them
PAHO_PREFIX = "rawpaho"


def mosquitto_sub_version() -> str:
    """``mosquitto_sub version X running on libmosquitto Y`` (its --help's second line), or why not."""
    try:
        out = subprocess.run(["mosquitto_sub", "--help"], capture_output=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"mosquitto_sub unavailable: {e}"
    lines = out.decode(errors="replace").splitlines()
    return lines[1].strip() if len(lines) > 1 else "mosquitto_sub: version unknown"


class NativeSubscriber:
    """``mosquitto_sub`` on a persistent session: ``start(n)`` before the clock, ``wait()`` after "go"."""

    def __init__(self, host: str, port: int, user: str, password: str, broker_log: Path) -> None:
        self.base = ["mosquitto_sub", "-h", host, "-p", str(port), "-u", user, "-P", password, "-i", user,
                     "-c", "-t", f"{NATIVE_PREFIX}/#", "-q", "1"]
        self.user, self.broker_log = user, broker_log
        self.proc: subprocess.Popen | None = None
        prime = subprocess.run([*self.base, "-E"], capture_output=True, timeout=30)
        if prime.returncode != 0:
            raise RuntimeError(f"mosquitto_sub -E exited {prime.returncode}: {prime.stdout + prime.stderr!r}")

    def start(self, expect: int) -> None:
        offset = self.broker_log.stat().st_size
        self.count, self.bytes, self.output = 0, 0, b""
        self.proc = subprocess.Popen([*self.base, "-C", str(expect), "-F", "%l"], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def read() -> None:
            self.output = self.proc.stdout.read()  # block-buffered: arrives in chunks and at exit

        self.reader = threading.Thread(target=read, name="mosquitto_sub-out", daemon=True)
        self.reader.start()
        marker = f" as {self.user} (".encode()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with open(self.broker_log, "rb") as f:
                f.seek(offset)
                if marker in f.read():
                    return
            time.sleep(0.005)
        self.kill()
        raise RuntimeError(f"mosquitto_sub: the broker never logged its connection ({self.broker_log})")

    def wait(self, timeout: float) -> tuple[float, float]:
        """(perf_counter at exit, CPU seconds user+sys) once it has its N messages; RuntimeError if not."""
        deadline = time.monotonic() + timeout
        while True:  # os.wait4 has no timeout: poll with WNOHANG
            pid, status, ru = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                ended = time.perf_counter()
                break
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"mosquitto_sub: no exit after {timeout} s")
            time.sleep(0.0005)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.reader.join(10)
        lines = self.output.split()
        if self.proc.returncode != 0 or not all(x.isdigit() for x in lines):
            raise RuntimeError(f"mosquitto_sub exited {self.proc.returncode}: {self.output[-500:]!r}")
        self.count, self.bytes = len(lines), sum(int(x) for x in lines)
        return ended, ru.ru_utime + ru.ru_stime

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def _paho_child(conn, host: str, port: int, user: str, password: str) -> None:
    import resource

    import paho.mqtt.client as paho
    from paho.mqtt import _packet
    from paho.mqtt.enums import CallbackAPIVersion

    lock = threading.Lock()
    state = {"count": 0, "bytes": 0, "expect": 0, "last": 0.0}
    ready, done = threading.Event(), threading.Event()

    def on_message(client, userdata, msg) -> None:
        with lock:
            state["count"] += 1
            state["bytes"] += len(msg.payload)
            if state["count"] >= state["expect"]:
                state["last"] = time.perf_counter()
                done.set()

    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=user, clean_session=True, protocol=paho.MQTTv311)
    c.username_pw_set(user, password)
    c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(f"{PAHO_PREFIX}/#", 1)
    c.on_subscribe = lambda *a: ready.set()
    c.on_message = on_message
    c.connect(host, port, 30)
    c.loop_start()
    decoder = f"{_packet.decode_publish.__module__}.{_packet.decode_publish.__qualname__}"
    conn.send(("ready" if ready.wait(15) else "no SUBACK", decoder))
    try:
        while True:
            cmd = conn.recv()
            if cmd[0] == "quit":
                return
            with lock:
                state.update(count=0, bytes=0, expect=cmd[1])
                done.clear()
            r = resource.getrusage(resource.RUSAGE_SELF)
            cpu0 = r.ru_utime + r.ru_stime
            conn.send(("armed",))
            if not done.wait(600):
                conn.send(("timeout", state["count"]))
                continue
            r = resource.getrusage(resource.RUSAGE_SELF)
            conn.send(("done", state["last"], state["count"], state["bytes"], r.ru_utime + r.ru_stime - cpu0))
    finally:
        c.loop_stop()
        c.disconnect()


class PahoSubscriber:
    """A plain paho subscriber (paho_fast not installed) in a child process of its own."""

    def __init__(self, host: str, port: int, user: str, password: str) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_paho_child, args=(child, host, port, user, password),
                                name="ingest-paho-sub", daemon=True)
        self.proc.start()
        if not self._conn.poll(30):
            self.close()
            raise RuntimeError("paho subscriber: child did not start")
        status, self.decoder = self._conn.recv()
        if status != "ready":
            self.close()
            raise RuntimeError(f"paho subscriber: {status}")
        if self.decoder != "paho.mqtt._packet.decode_publish":
            self.close()
            raise RuntimeError(f"paho subscriber: not plain paho, decode_publish is {self.decoder}")

    def arm(self, expect: int) -> None:
        self._conn.send(("arm", expect))
        if self._conn.recv() != ("armed",):
            raise RuntimeError("paho subscriber: not armed")

    def wait(self, timeout: float) -> tuple[float, int, int, float]:
        """(perf_counter of the last message, messages, bytes, child CPU seconds)."""
        if not self._conn.poll(timeout):
            raise RuntimeError(f"paho subscriber: nothing after {timeout} s")
        reply = self._conn.recv()
        if reply[0] != "done":
            raise RuntimeError(f"paho subscriber: {reply}")
        return reply[1], reply[2], reply[3], reply[4]

    def close(self) -> None:
        try:
            self._conn.send(("quit",))
        except OSError:
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
