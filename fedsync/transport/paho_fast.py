"""One payload copy instead of three per PUBLISH that paho-mqtt 2.x receives.

paho's ``_packet.decode_publish`` peels an MQTT 3.1.1 PUBLISH with three
``struct.unpack("!H{n}s")`` calls (topic length, topic, packet id), and each
one copies the whole rest of the packet. On the coordinator, for a 256 KiB
update shard, those copies (fresh allocations, so page faults too) were the
largest single GIL-held cost of the receive path (py-spy, benchmarks/ingest.py).
:func:`decode_publish` reads the same fields by index and copies the payload once.

It replaces paho's function only where it is a drop-in: paho 2.x with the
``PublishPacket`` fields below, and only for MQTT 3.1/3.1.1 packets (MQTT 5
packets, with properties, still go to paho's own code). Malformed packets raise
paho's ``MalformedPacket`` exactly where paho's would; tests/test_fastpaths.py checks
both functions against each other on generated and truncated packets.
"""

from __future__ import annotations

import logging

log = logging.getLogger("fedsync.mqtt")

_FIELDS = ("dup", "qos", "retain", "topic", "mid", "properties", "payload")

try:
    from paho.mqtt import _packet
    from paho.mqtt.enums import MQTTProtocolVersion
    from paho.mqtt.exception import MalformedPacket
except ImportError:  # a paho without these internals: leave it alone
    _packet = None

ORIGINAL = getattr(_packet, "decode_publish", None)


def decode_publish(header: int, packet: bytes | bytearray, protocol):
    """paho's ``decode_publish`` for MQTT 3.1/3.1.1, with one copy of the payload."""
    if protocol == MQTTProtocolVersion.MQTTv5:
        return ORIGINAL(header, packet, protocol)
    n = len(packet)
    if n < 2:
        raise MalformedPacket("PUBLISH shorter than its topic length")
    pos = 2 + ((packet[0] << 8) | packet[1])
    if pos > n:
        raise MalformedPacket("PUBLISH topic runs past the packet")
    topic = bytes(packet[2:pos])
    if not topic:
        raise MalformedPacket("topic can't be empty in MQTTv3")
    qos = (header & 0x06) >> 1
    mid = 0
    if qos > 0:
        if pos + 2 > n:
            raise MalformedPacket("PUBLISH without its packet identifier")
        mid = (packet[pos] << 8) | packet[pos + 1]
        pos += 2
    with memoryview(packet) as view:
        payload = bytes(view[pos:])
    return _packet.PublishPacket(dup=(header & 0x08) != 0, qos=qos, retain=(header & 0x01) != 0, topic=topic,
                                 mid=mid, properties=None, payload=payload)


def install() -> bool:
    """Use :func:`decode_publish` in paho if paho's is the one this was written against."""
    if _packet is None or ORIGINAL is None or getattr(_packet.PublishPacket, "_fields", None) != _FIELDS:
        log.info("paho_fast_not_installed reason=unknown paho internals")
        return False
    _packet.decode_publish = decode_publish
    return True
