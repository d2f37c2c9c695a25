"""Refuse rows ClickHouse cannot hold, before they reach the sink.

An event can decode and validate yet carry numbers no column can store (a negative or 2**40
attempt for a UInt32 column) or that would poison every later answer (a NaN or infinite cost
makes the JSON API fail for the whole team). Inserted, such a row fails the whole batch, the sink
gives up (Fatal), the records are redelivered and the service crash-loops on one bad record.
Checked per event instead, the event is dead-lettered with the column at fault and the rest flows
on (invariant 7). The ranges follow the column types in infra/clickhouse/.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from fleetplane.accounting.rows import COLUMNS, Row
from fleetplane.core.errors import NotRetriable

_UINT = {"UInt8": 2**8, "UInt16": 2**16, "UInt32": 2**32, "UInt64": 2**64}
#: column -> ClickHouse type, for the numeric columns of every table rows.py fills
NUMERIC: dict[str, str] = {
    "schema_version": "UInt16", "partition": "UInt32", "offset": "UInt64",
    "attempt": "UInt32", "call_index": "UInt32", "slot": "UInt32", "attempts": "UInt32",
    "audit_count": "UInt32", "input_tokens": "UInt64", "output_tokens": "UInt64",
    "cache_creation_input_tokens": "UInt64", "cache_read_input_tokens": "UInt64",
    "added": "UInt64", "removed": "UInt64", "terminal": "UInt8", "state_rank": "UInt8",
    "success": "UInt8", "final": "UInt8", "cached": "UInt8",
    "cost_usd": "cost", "latency_ms": "Float64", "duration_ms": "Float64",
    "window_s": "Float64", "model_s": "Float64", "tool_s": "Float64", "busy_s": "Float64",
    "idle_s": "Float64", "value": "Float64", "baseline": "Float64",
}


class Unstorable(NotRetriable):
    """The event holds a value its ClickHouse column cannot take (dead-lettered)."""


def problem(column: str, value: object) -> str | None:
    kind = NUMERIC.get(column)
    if kind is None or value is None or isinstance(value, bool):
        return None
    if kind in _UINT:
        if not isinstance(value, int) or not 0 <= value < _UINT[kind]:
            return f"{column}={value!r} is outside {kind}"
        return None
    if not isinstance(value, int | float) or not math.isfinite(value):
        return f"{column}={value!r} is not a finite number"
    if kind == "cost" and value < 0:
        return f"{column}={value!r} is negative"
    return None


#: table -> (index, column, type) of its numeric columns (the only ones check() visits)
_CHECKS: dict[str, tuple[tuple[int, str, str], ...]] = {
    table: tuple((i, c, NUMERIC[c]) for i, c in enumerate(cols) if c in NUMERIC)
    for table, cols in COLUMNS.items()}


def _fine(kind: str, value: object) -> bool:
    """The common case, decided without building a message: an int in range, a finite float."""
    if type(value) is int:
        limit = _UINT.get(kind)
        if limit is not None:
            return 0 <= value < limit
        return kind != "cost" or value >= 0
    if type(value) is float:
        return kind not in _UINT and value - value == 0.0 and (kind != "cost" or value >= 0)
    return value is None


def check(rows: Mapping[str, Sequence[Row]]) -> None:
    """Raise Unstorable naming the first value no column can hold."""
    for table, batch in rows.items():
        checks = _CHECKS[table]
        for row in batch:
            for i, column, kind in checks:
                value = row[i] if i < len(row) else None
                if _fine(kind, value):
                    continue
                why = problem(column, value)
                if why:
                    raise Unstorable(f"not stored in {table}: {why}")
