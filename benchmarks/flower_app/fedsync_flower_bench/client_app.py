"""The ClientApp: the same fake local training as fedsync's NoiseTrainer.

params + noise_scale * N(0, 1), float32, from ``numpy.random.default_rng([seed, client, round])``,
weight ``num-samples``. One SuperNode may serve several logical clients: the ServerApp names the
client (partition) in each message's config, so the training does not depend on which node runs it.
"""

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
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
    return Message(content=content, reply_to=msg)
