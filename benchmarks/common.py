"""Shared helpers for the benchmarks: import path, broker users, tables, the one-line environment note.

Every benchmark is a script (``python benchmarks/NAME.py [--quick]``) that
starts what it needs on 127.0.0.1, stops it all on exit, prints a table and
the ratios against its baseline, and can write the same as JSON (``--json``).
"""

from __future__ import annotations

import os
import platform
import secrets
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: import the checkout, not an install
    sys.path.insert(0, str(ROOT))

MIB = 1024 * 1024


def make_users(names: list[str]) -> dict[str, str]:
    """A fresh random password for each broker account."""
    return {name: secrets.token_urlsafe(12) for name in names}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def environment() -> str:
    """One line saying where a number was measured (results depend on it)."""
    import numpy as np

    try:
        import paho.mqtt as paho_mqtt
        paho_version = paho_mqtt.__version__
    except Exception:  # noqa: BLE001 - informational only
        paho_version = "?"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.machine()} {os.cpu_count()} cpu, Python {platform.python_version()}, "
            f"numpy {np.__version__}, paho-mqtt {paho_version}, load1 {load:.2f} at start")


def print_table(title: str, columns: list[str], rows: list[list[object]]) -> None:
    """A rich table when rich is installed (coordinator extra), plain text otherwise."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        print(" | ".join(columns))
        for row in rows:
            print(" | ".join(str(c) for c in row))
        return
    table = Table(title=title)
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*[str(c) for c in row])
    Console(width=max(100, sum(len(c) + 5 for c in columns))).print(table)
