"""The ServerApp: synchronous FedAvg rounds over ``num-clients`` logical clients.

A plain loop over ``grid.send_and_receive`` rather than a Strategy, because the logical
clients outnumber the SuperNodes: client i goes to node ``i % len(nodes)``, so 100 clients
on 10 SuperNodes are 10 messages per node per round (each message starts one ClientApp
process on its node: Flower 1.42's deployment engine). Each round's wall time (from the
first message pushed to the last reply aggregated) is appended to ``results-file``.
"""

import json
import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    num_params, num_clients = int(cfg["num-params"]), int(cfg["num-clients"])
    results = str(cfg["results-file"])
    nodes: list[int] = []
    deadline = time.time() + 120
    while time.time() < deadline:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= int(cfg["min-nodes"]):
            break
        time.sleep(0.5)
    model = np.zeros(num_params, np.float32)
    for rnd in range(1, int(cfg["num-rounds"]) + 1):
        t0 = time.time()
        messages = []
        for client in range(num_clients):
            config = ConfigRecord({"client": client, "server-round": rnd, "seed": int(cfg["seed"]),
                                   "noise-scale": float(cfg["noise-scale"]), "num-samples": int(cfg["num-samples"])})
            content = RecordDict({"arrays": ArrayRecord([model]), "config": config})
            messages.append(Message(content=content, dst_node_id=nodes[client % len(nodes)], message_type="train"))
        replies = list(grid.send_and_receive(messages, timeout=600))
        total = np.zeros(num_params, np.float64)
        weight, ok = 0, 0
        for r in replies:
            if r.has_error():
                continue
            n = int(r.content["metrics"]["num-examples"])
            total += n * r.content["arrays"].to_numpy_ndarrays()[0]
            weight += n
            ok += 1
        if weight:
            model = (total / weight).astype(np.float32)
        seconds = time.time() - t0
        if results:
            with open(results, "a", encoding="utf-8") as f:
                f.write(json.dumps({"round": rnd, "seconds": seconds, "replies": ok, "nodes": len(nodes),
                                    "pushed": t0, "done": t0 + seconds,
                                    "max_abs": float(np.abs(model).max())}) + "\n")
