"""The publishers of benchmarks/ingest.py: N plain paho clients in one child process.

Theory of operation
-------------------
:func:`publisher_main` runs in a spawned process and owns one paho client (own network
thread, client id = user = device id, QoS 1, a 32-message in-flight window as
``MqttLink`` uses) per publisher identity, each with a fixed N(0, 1e-3) delta. It
announces every identity ``online`` (retained status) and then obeys commands from the
benchmark on a pipe:

* ``("encode", round_id)``: wait for that round's open manifest (the first client watches
  the retained manifest), encode every identity's delta with the device agent's own
  encoder (so the bytes are what real agents send), keep them, answer
  ``("ready", payload bytes, messages)``;
* ``("go", prefix)``: publish every kept shard from one thread per identity (under
  ``prefix`` in place of ``fedsync`` when given: the raw baseline's topics), wait for
  every PUBACK, answer ``("published", first send, last PUBACK)`` (``perf_counter``);
* ``("quit",)``: retained ``offline`` for every identity, disconnect, return.

Building payloads happens on ``encode``, before the clock of a trial starts.
"""

from __future__ import annotations

import random
import threading
import time

FEDERATION = "bench"


def publisher_main(conn, url: str, users: dict[str, str], devices: list[str], num_params: int, seed: int) -> None:
    """Child process: N paho clients that announce themselves online and publish on command.

    Commands on ``conn``: ("encode", round_id) -> ("ready", bytes, messages);
    ("go", prefix or None) -> ("published", first_send, last_puback); ("quit",).
    """
    import numpy as np
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from fedsync.device_agent.agent import AgentCore
    from fedsync.messages import PeerStatus, RoundManifest, decode, encode
    from fedsync.address import BrokerAddress
    from fedsync.topics import Topics

    topics = Topics(FEDERATION)
    addr = BrokerAddress.parse(url)
    manifests: list[RoundManifest] = []
    got_manifest = threading.Condition()
    rng = np.random.default_rng(seed)
    deltas = {d: (rng.standard_normal(num_params, dtype=np.float32) * np.float32(1e-3)) for d in devices}

    clients, acked = {}, {d: 0 for d in devices}
    lock = threading.Lock()

    def on_publish(client, userdata, mid, rc, props):
        with lock:
            acked[userdata] += 1

    def on_message(client, userdata, msg):
        if msg.topic == topics.manifest and msg.payload:
            with got_manifest:
                manifests.append(decode(bytes(msg.payload), RoundManifest))
                got_manifest.notify_all()

    for d in devices:
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=d, clean_session=True, userdata=d,
                        protocol=paho.MQTTv311)
        c.username_pw_set(d, users[d])
        c.max_inflight_messages_set(32)  # the same window MqttLink uses
        c.on_publish = on_publish
        if d == devices[0]:  # one of them watches the retained manifest (re-subscribing on reconnect)
            c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(topics.manifest, 1)
        c.on_message = on_message
        c.connect(addr.host, addr.port, 30)
        c.loop_start()
        clients[d] = c
    for d in devices:
        clients[d].publish(topics.status(d), encode(PeerStatus(d, "online")), 1, True)

    batches: dict[str, list[tuple[str, bytes]]] = {}
    while True:
        cmd = conn.recv()
        if cmd[0] == "quit":
            break
        if cmd[0] == "encode":
            round_id = cmd[1]
            with got_manifest:
                got_manifest.wait_for(lambda: any(m.round_id == round_id and m.state == "open" for m in manifests), 60)
                m = next(m for m in reversed(manifests) if m.round_id == round_id and m.state == "open")
                manifests.clear()
            total = 0
            for d in devices:
                # Exactly the agent's encoder; update ids from the agent's own seeded RNG.
                up = AgentCore(d, topics, random.Random(f"{seed}:{d}:{round_id}")).encode_update(
                    m, deltas[d], 100, {"train_loss": 1.0})
                batches[d] = list(zip(up.topics, up.payloads))
                total += sum(len(p) for p in up.payloads)
            conn.send(("ready", total, sum(len(b) for b in batches.values())))
        elif cmd[0] == "go":
            prefix = cmd[1]
            with lock:
                for d in devices:
                    acked[d] = 0
            first = time.perf_counter()

            def send(d: str) -> None:
                c = clients[d]
                for topic, payload in batches[d]:
                    if prefix:
                        topic = prefix + topic[len("fedsync"):]
                    c.publish(topic, payload, 1, False)

            threads = [threading.Thread(target=send, args=(d,)) for d in devices]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            want = {d: len(batches[d]) for d in devices}
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                with lock:
                    if all(acked[d] >= want[d] for d in devices):
                        break
                time.sleep(0.001)
            conn.send(("published", first, time.perf_counter()))
    for d in devices:
        clients[d].publish(topics.status(d), encode(PeerStatus(d, "offline")), 1, True).wait_for_publish(5)
        clients[d].loop_stop()
        clients[d].disconnect()
