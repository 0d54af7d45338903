"""Small helpers shared by the broker tests."""

from __future__ import annotations

import time


def wait_until(predicate, timeout: float, what: str) -> None:
    """Poll ``predicate`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def run_federation(fed, timeout: float, what: str = "the rounds to commit") -> dict:
    """Start a LocalFederation, wait for all its rounds, stop it (always) and return its summary."""
    fed.start()
    try:
        assert fed.wait(timeout), f"timed out after {timeout}s waiting for {what}"
        return fed.summary()
    finally:
        fed.stop()
