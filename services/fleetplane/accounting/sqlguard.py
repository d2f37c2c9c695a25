"""Read-only SQL for analysts (`fleetplane sql`, `POST /v1/sql`).

Defence in depth, the same on chdb and on a server:
1. one statement only (a `;` inside the text is refused);
2. ClickHouse parses the statement (``EXPLAIN AST``, which runs nothing): it must be a SELECT
   (``SelectWithUnionQuery``; WITH ... SELECT included), with no SETTINGS clause (the limits below
   must hold), no INTO OUTFILE and no table function other than numbers() (file(), url(),
   remote(), executable() ... would read or run things outside the fleetplane tables);
3. it runs with max_execution_time and max_result_rows (result_overflow_mode=throw) and, on a
   ClickHouse server, readonly=2 (reads only; the limits may still be set by the request, and a
   SETTINGS clause in the query was refused above). chdb applies per-query settings to its one
   session and could not take readonly back, so there the parser check is the guarantee.
"""

from __future__ import annotations

import base64
import re
from typing import Any

from fleetplane.accounting.store import Store, is_chdb

ALLOWED_TABLE_FUNCTIONS = frozenset({"numbers", "numbers_mt", "zeros", "one"})
_OUTFILE = re.compile(r"\bINTO\s+OUTFILE\b", re.IGNORECASE)
_TABLE_FUNCTION = re.compile(r"^Function (\w+)")


class SqlRefused(ValueError):
    """The statement is not a read-only query (the message says why); do not retry."""


def normalize(sql: str) -> str:
    text = sql.strip()
    while text.endswith(";"):
        text = text[:-1].rstrip()
    if not text:
        raise SqlRefused("empty query")
    if ";" in text:
        raise SqlRefused("one statement only: remove the ';' (multi-statement queries are refused)")
    if _OUTFILE.search(text):
        raise SqlRefused("INTO OUTFILE writes files: refused (read-only)")
    return text


def check_ast(ast_lines: list[str]) -> None:
    """Raise SqlRefused unless the parsed statement is a plain SELECT (see module doc)."""
    if not ast_lines:
        raise SqlRefused("could not parse the query")
    kind = ast_lines[0].split(" ", 1)[0]
    if kind != "SelectWithUnionQuery":
        statement = kind.removesuffix("Query") or "statement"
        raise SqlRefused(f"read-only: only SELECT queries are allowed, this is a {statement} "
                         "(writes, DDL and settings changes are refused)")
    previous = ""
    for line in ast_lines:
        node = line.strip()
        if node == "Set" or node.startswith("Set "):
            raise SqlRefused("SETTINGS clauses are refused (the time and row limits are fixed)")
        match = _TABLE_FUNCTION.match(node)
        if match and previous.startswith("TableExpression") and (
                match.group(1) not in ALLOWED_TABLE_FUNCTIONS):
            raise SqlRefused(f"table function {match.group(1)}() is refused: query the "
                             "fleetplane tables")
        previous = node


def run_readonly(store: Store, sql: str, *, max_execution_time_s: int,
                 max_result_rows: int) -> dict[str, Any]:
    """Check and run an analyst's query: {"columns": [...], "rows": [[...]...]}.

    SqlRefused for anything but a read-only SELECT; ClickHouse errors (a syntax error, a
    timeout, too many rows) propagate as the driver's DatabaseError."""
    text = normalize(sql)
    ast = store.query_rows(f"EXPLAIN AST {text}")
    check_ast([str(r[0]) for r in ast])
    settings: dict[str, Any] = {
        "max_execution_time": int(max_execution_time_s),
        "max_result_rows": int(max_result_rows),
        "result_overflow_mode": "throw",
    }
    if not is_chdb(store.dsn):
        settings["readonly"] = 2   # read-only; 2 lets the limits above be set in the request
    columns, rows = store.query_table(text, settings=settings)
    return {"columns": columns, "rows": [[_plain(v) for v in row] for row in rows]}


def _plain(value: Any) -> Any:
    """Binary strings (e.g. events.avro) as base64, so every answer is JSON."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(value).decode("ascii")
    return value
