"""The human summary that ``fedsync demo`` and ``fedsync fieldtest`` print at the end of a run.

Both print it to stdout, where the result of a command belongs (progress bars and
status spinners stay on stderr). With ``--json`` stdout holds the JSON summary alone
(``fedsync demo --json | jq .`` works) and the table goes to stderr, for the person
watching.
"""

from __future__ import annotations

from collections.abc import Iterable


def print_summary(title: str, rows: Iterable[tuple[str, str]], *, stderr: bool = False) -> None:
    """Print a two-column table of (label a person reads, value) to stdout (or stderr).

    >>> print_summary("fedsync demo (sync)", [("Rounds committed", "2")])  # doctest: +SKIP
    """
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for label, value in rows:
        table.add_row(label, value)
    Console(stderr=stderr).print(table)


def number(value: float | int | None, digits: int = 4) -> str:
    """A summary value as text: floats to ``digits`` places, ints with thousands separators, None as "-".

    >>> number(0.81234), number(1234567), number(None)
    ('0.8123', '1,234,567', '-')
    """
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
