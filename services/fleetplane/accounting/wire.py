"""How the sink's columns go over the wire: cheap for the driver, the same rows in ClickHouse.

clickhouse-connect serializes a Native block in Python for two of the sink's column kinds, per
value (py-spy and cProfile on the sink, issue 18 sixth round):

* `LowCardinality(String)`: a dictionary built value by value (`_build_lc_dictionary`), more
  than half of the driver's time. Sent as plain `String` instead (its Cython writer), and
  ClickHouse converts to the table's LowCardinality type when it reads the block
  (`input_format_native_allow_types_conversion`, on by default): the stored column is the same.
* `DateTime64(p)`: `datetime.timestamp()` and arithmetic per value. Converted here with C-level
  `map` (aware datetime - epoch, floor-divided by one tick: exact integer arithmetic, the same
  floor the driver applies); a column the fast form cannot take (naive or None values) goes to
  the driver unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from itertools import repeat
from operator import floordiv, sub
from typing import Any

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DATETIME64 = re.compile(r"^DateTime64\((\d)")


def wire_type(name: str) -> str:
    """The type a column is sent as: a top-level LowCardinality(T) as T, others unchanged."""
    if name.startswith("LowCardinality(") and name.endswith(")"):
        return name[len("LowCardinality("):-1]
    return name


def tick_of(name: str) -> timedelta | None:
    """One tick of a DateTime64 column (precision 0-6), else None."""
    match = _DATETIME64.match(name)
    if match is None or int(match.group(1)) > 6:
        return None
    return timedelta(microseconds=10 ** (6 - int(match.group(1))))


def ticks(column: Sequence[Any], tick: timedelta) -> Sequence[Any]:
    """Aware datetimes as integer ticks since the epoch (floored, as the driver does); the
    column unchanged when a value is not an aware datetime (the driver then converts it)."""
    if not column or type(column[0]) is not datetime:
        return column
    try:
        return list(map(floordiv, map(sub, column, repeat(EPOCH)), repeat(tick)))
    except TypeError:   # naive datetimes (cannot be subtracted from an aware one), None
        return column
