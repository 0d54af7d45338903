"""Connection trouble is said at WARNING, once and then with backoff, naming the cause.

Each scenario runs the real `fedsync agent` against a broker it cannot use — a closed
port, a TLS broker whose certificate another CA signed, a wrong password — and reads
its stderr. The positive control is the same agent with the right CA and password,
which logs `connected` and no trouble.
"""

from __future__ import annotations

import os
import re
import ssl
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fedsync.broker_config.process import free_port, mosquitto_available
from fedsync.address import BrokerAddress
from fedsync.transport.mqtt import describe_connect_error
from tests.util import stop_process, wait_until

FEDSYNC = os.path.join(os.path.dirname(sys.executable), "fedsync")
ADDRESS = BrokerAddress("broker.lan", 8883, True)


@pytest.mark.parametrize("exc, kind, detail", [
    (ConnectionRefusedError(111, "Connection refused"), "refused", "broker.lan:8883: connection refused (nothing listening?)"),
    (socket.gaierror(-2, "Name or service not known"), "dns", "cannot resolve host 'broker.lan' (Name or service not known)"),
    (TimeoutError("timed out"), "timeout", "broker.lan:8883: no answer (timed out)"),
    (ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"), "tls",
     "broker.lan:8883: TLS handshake failed ([SSL: WRONG_VERSION_NUMBER] wrong version number); is the port a TLS listener?"),
])
def test_each_failure_is_named_in_words(exc, kind, detail):
    assert describe_connect_error(exc, ADDRESS, "ca.pem") == (kind, detail)


def test_an_untrusted_certificate_names_the_ca_file():
    exc = ssl.SSLCertVerificationError(1, "certificate verify failed")
    exc.verify_message = "unable to get local issuer certificate"
    assert describe_connect_error(exc, ADDRESS, "/etc/fedsync/ca.pem") == (
        "tls_verify", "broker.lan:8883: broker certificate not trusted (unable to get local issuer certificate; "
                      "CA file /etc/fedsync/ca.pem)")


class Agent:
    def __init__(self, tmp: Path, name: str, *args: str, device: str = "pi-kitchen") -> None:
        self.log = tmp / f"{name}.log"
        self.device = device
        self.proc = subprocess.Popen([FEDSYNC, "agent", "--device-id", device, "--federation", "demo", *args],
                                     stdout=subprocess.DEVNULL, stderr=self.log.open("wb"))

    def text(self) -> str:
        return self.log.read_text()

    def warnings(self) -> list[str]:
        return [ln for ln in self.text().splitlines() if " WARNING fedsync.mqtt connect_failed " in ln]

    def stop(self) -> int:
        return stop_process(self.proc, grace=15)


def _failures(lines: list[str]) -> list[int]:
    return [int(re.search(r" failures=(\d+)", ln).group(1)) for ln in lines]


def test_a_closed_port_is_reported_at_once_then_with_backoff(tmp_path):
    port = free_port()
    agent = Agent(tmp_path, "closed", "--broker", f"mqtt://127.0.0.1:{port}")
    try:
        wait_until(lambda: len(agent.warnings()) >= 3, 30, "three connect_failed warnings")
    finally:
        assert agent.stop() == 0
    warnings = agent.warnings()
    assert f'kind=refused detail="127.0.0.1:{port}: connection refused (nothing listening?)"' in warnings[0]
    assert _failures(warnings)[:3] == [1, 2, 4]  # 3rd, 5th, 6th, 7th ... only at DEBUG
    assert "Traceback" not in agent.text()


needs_mosquitto = pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed")


@needs_mosquitto
@pytest.mark.broker
def test_untrusted_tls_and_a_wrong_password_are_named_and_the_right_ones_connect(tmp_path):
    from fedsync.broker_config.tls import make_ca
    from tests.secured_broker import rendered_broker

    other_ca = tmp_path / "other-ca.pem"
    other_ca.write_bytes(make_ca("someone else's CA").cert_pem())
    with rendered_broker() as s:
        good_pw = tmp_path / "good.pw"
        good_pw.write_text(s.users["dev-0"] + "\n")
        bad_pw = tmp_path / "bad.pw"
        bad_pw.write_text("not-the-password\n")
        url = s.broker.url
        agents = {
            "untrusted": Agent(tmp_path, "untrusted", "--broker", url, "--ca-file", str(other_ca),
                               "--password-file", str(good_pw), device="dev-0"),
            "auth": Agent(tmp_path, "auth", "--broker", url, "--ca-file", s.ca, "--password-file", str(bad_pw),
                          device="dev-1"),
            "good": Agent(tmp_path, "good", "--broker", url, "--ca-file", s.ca, "--password-file", str(good_pw),
                          device="dev-0"),
            # plain MQTT to the TLS port: mosquitto closes it before any CONNACK
            "plain": Agent(tmp_path, "plain", "--broker", url.replace("mqtts://", "mqtt://"), "--password-file",
                           str(good_pw), device="dev-0"),
        }
        try:
            wait_until(lambda: agents["untrusted"].warnings() and agents["auth"].warnings()
                       and agents["plain"].warnings()
                       and " connected client=dev-0" in agents["good"].text(), 30, "all four outcomes")
        finally:
            codes = {name: a.stop() for name, a in agents.items()}
    assert codes == {"untrusted": 0, "auth": 0, "good": 0, "plain": 0}
    port = url.rsplit(":", 1)[1]
    assert (f'kind=closed_before_connack detail="127.0.0.1:{port}: connection closed before CONNACK '
            f'(is it a TLS port? then use mqtts://)"') in agents["plain"].warnings()[0]
    untrusted = agents["untrusted"].warnings()[0]
    assert "kind=tls_verify" in untrusted and f"CA file {other_ca})" in untrusted
    auth = agents["auth"].warnings()[0]
    assert "kind=auth" in auth and "refused the login of 'dev-1'" in auth
    # the delay it really waits (it said retry_in=0.0 while the backoff waited 0.2 s and more)
    assert 0.0 < float(re.search(r"retry_in=(\S+)", auth).group(1)) <= 0.2
    assert agents["good"].warnings() == []
