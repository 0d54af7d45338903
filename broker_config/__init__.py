"""MQTT brokers for fedsync: the embedded amqtt broker and managed mosquitto.

``BrokerProcess`` runs either one as a subprocess on 127.0.0.1 (tests, demo,
benchmarks); ``render_mosquitto_conf`` produces the mosquitto configuration whose
settings follow the measurements in docs/brokers.md; ``fedsync.broker_config.embedded`` is the amqtt entry
point (``run_embedded``, ``write_password_file``). amqtt is for demos and labs,
mosquitto for the field.
"""

# fedsync.broker_config.embedded is deliberately not imported here: it runs as
# `python -m fedsync.broker_config.embedded`, and runpy warns when the package has already
# imported the module it is about to execute.
from fedsync.broker_config.mosquitto import (
    mosquitto_available,
    render_mosquitto_conf,
    write_mosquitto_password_file,
)
from fedsync.broker_config.process import BrokerProcess, free_port

__all__ = [
    "BrokerProcess",
    "free_port",
    "mosquitto_available",
    "render_mosquitto_conf",
    "write_mosquitto_password_file",
]
