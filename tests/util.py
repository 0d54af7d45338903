"""Small helpers shared by the tests: wait for a condition, run a federation, end a process.

One of each: a test that polls uses :func:`wait_until`, one that starts a process ends it
with :func:`stop_process`, one that reads a running coordinator's core uses :func:`on_service_thread`.
"""

from __future__ import annotations

import queue
import signal
import subprocess
import time


def wait_until(predicate, timeout: float, what: str) -> None:
    """Poll ``predicate`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def on_service_thread(service, fn, timeout: float = 10.0):
    """``fn(core)`` run on a running CoordinatorService's own thread, the only one that touches
    its core, and its result: a consistent read (e.g. ``lambda core: core.stats.snapshot()``)
    instead of reading the core from the test thread while the service changes it."""
    box: queue.Queue = queue.Queue(maxsize=1)

    def call(core, now):
        box.put(fn(core))
        return []

    service.call(call)
    try:
        return box.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"the coordinator's thread did not run the call within {timeout}s") from None


def run_federation(fed, timeout: float, what: str = "the rounds to commit") -> dict:
    """Start a LocalFederation, wait for all its rounds, stop it (always) and return its summary."""
    fed.start()
    try:
        assert fed.wait(timeout), f"timed out after {timeout}s waiting for {what}"
        return fed.summary()
    finally:
        fed.stop()


def stop_process(proc: subprocess.Popen, grace: float = 10.0, sig: int = signal.SIGTERM) -> int:
    """End ``proc`` and every process it started; reap ``proc``; return its exit code.

    ``sig`` (SIGTERM: a clean stop; SIGKILL: a crash) goes after a SIGCONT, since a stopped
    process cannot act on it; SIGKILL follows after ``grace`` seconds. Descendants (a broker
    ``fedsync demo`` started in a session of its own, say) are noted first, with psutil,
    and killed once ``proc`` has ended, so none outlives the test. A process already reaped
    is left alone.

    >>> stop_process(subprocess.Popen(["sleep", "60"]))
    -15
    """
    import psutil

    try:
        descendants = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
    except psutil.Error:  # gone (or a zombie) between poll() and the look
        descendants = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    for child in descendants:
        try:
            child.kill()
        except psutil.Error:
            pass
    return proc.returncode
