"""The ClientApp: the same fake local training as fedsync's NoiseTrainer.

params + noise_scale * N(0, 1), float32, from ``numpy.random.default_rng([seed, client, round])``,
weight ``num-samples``. One SuperNode may serve several logical clients: the ServerApp names the
client (partition) in each message's config, so the training does not depend on which node runs it.

When the run config names a ``timings-file``, each message appends one JSON line to it: the
ClientApp process's start (wall clock, from /proc/self/stat, 10 ms ticks), the start and end of
``train`` and the CPU the process had used before ``train`` (its start-up: interpreter, flwr and
numpy imports, fetching the app and the message). benchmarks/round_time.py turns these into
where a round's time goes.
"""

import json
import os
import resource
import time

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def _process_started() -> float:
    """This process's start as a wall-clock time (Linux; resolution one clock tick)."""
    with open("/proc/self/stat", "rb") as f:
        ticks = int(f.read().rsplit(b")", 1)[1].split()[19])  # field 22, starttime, after "pid (comm)"
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - age


@app.train()
def train(msg: Message, context: Context) -> Message:
    entered = time.time()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cfg = msg.content["config"]
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    rng = np.random.default_rng([int(cfg["seed"]), int(cfg["client"]), int(cfg["server-round"])])
    scale = np.float32(cfg["noise-scale"])
    out = []
    for a in arrays:
        noise = rng.standard_normal(a.shape, dtype=np.float32)
        noise *= scale
        out.append((a + noise).astype(np.float32, copy=False))
    content = RecordDict({"arrays": ArrayRecord(out),
                          "metrics": MetricRecord({"num-examples": int(cfg["num-samples"]),
                                                   "client": int(cfg["client"])})})
    timings = str(context.run_config.get("timings-file", ""))
    if timings:
        line = {"round": int(cfg["server-round"]), "client": int(cfg["client"]), "node": int(context.node_id),
                "pid": os.getpid(), "process_start": _process_started(), "train_start": entered,
                "train_end": time.time(), "startup_cpu": usage.ru_utime + usage.ru_stime}
        with open(timings, "a", encoding="utf-8") as f:  # one short O_APPEND write per message
            f.write(json.dumps(line) + "\n")
    return Message(content=content, reply_to=msg)
