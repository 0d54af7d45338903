"""Shared fixtures: real brokers on 127.0.0.1 and the users they accept.

``broker_kind`` runs a test once per broker (mosquitto is skipped where it is not
installed); ``broker`` is a fresh, password-protected broker for one test, stopped
(and its temp dir removed) afterwards, pass or fail.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Lets a bare `pytest` (not only `python -m pytest` from the repo root) import the
# project's packages without installing them.
_PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)
if _PROJECT_ROOT not in sys.path:
    sys.path.insert(0, _PROJECT_ROOT)

from fedsync.broker_config.process import BrokerProcess, mosquitto_available  # noqa: E402

# The federation every broker test runs with: the coordinator and 32 devices, each
# logging in with its own user (the device id must equal the MQTT user: docs/brokers.md).
DEVICE_COUNT = 32
BROKER_USERS: dict[str, str] = {
    "coordinator": "coordinator-secret",
    **{f"dev-{i}": f"dev-{i}-secret" for i in range(DEVICE_COUNT)},
}

# In CI a missing mosquitto is an install bug, not a reason to skip half the suite.
if os.environ.get("CI") and not mosquitto_available():
    raise RuntimeError("CI: mosquitto is not installed; .ci/run must install it")

BROKER_KINDS = [
    "amqtt",
    pytest.param("mosquitto", marks=pytest.mark.skipif(
        not mosquitto_available(), reason="mosquitto and mosquitto_passwd are not installed")),
]


@pytest.fixture(params=BROKER_KINDS)
def broker_kind(request: pytest.FixtureRequest) -> str:
    """'amqtt' or 'mosquitto': a test using it runs once per broker."""
    return request.param


@pytest.fixture
def broker_users() -> dict[str, str]:
    """User name -> password for every account the ``broker`` fixture accepts (a copy)."""
    return dict(BROKER_USERS)


@pytest.fixture
def broker(broker_kind: str) -> Iterator[BrokerProcess]:
    """A running broker of ``broker_kind`` on 127.0.0.1 with anonymous login off."""
    process = BrokerProcess(broker_kind, users=BROKER_USERS)
    process.start()
    try:
        yield process
    finally:
        process.stop()
