"""Hand-written Flower 1.42 app for benchmarks/round_time.py (ServerApp + ClientApp, Message API)."""
