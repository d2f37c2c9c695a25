"""Probe for issue 18's next sink step: decoding the Avro bodies inside ClickHouse.

    python -m bench.sink_decode [--tasks 2000] [--rounds 6] [--dsn-dir /tmp/dir]

Not the service's path (see docs/accounting.md, "Sink, eighth round"): it measures what the
step would save before it is built. Both variants store the same ModelCall and ToolCall records
(the two highest-volume event types: 10 of a synthetic lifecycle's 16 events) into `events`,
`model_calls` and `tool_calls`, in 20,000-record flushes, alternating:

* `python`: today's fast path (columnar.rows_of: fastavro decode, row tuples, the JSON payload
  in orjson) and the driver's Native inserts (Store.insert, wire types);
* `sql`: Python reads only the fields the sink decides on (event id, task, team, attempt, call
  index, model, tier of a model call: `prefix`), then wraps each single-object body as one Avro
  record of a wrapper schema, (topic, partition, offset, raw bytes, keep, first_call,
  task_type) followed by the body's own fields (a record's encoding is its fields' encodings
  concatenated, so the body is appended as it is), writes one object-container file per event
  type and runs INSERT ... SELECT FROM file(..., 'Avro') into each table (the payload JSON
  built by ClickHouse: `formatRowNoNewline('JSONEachRow', ...)`, not byte-equal to
  model_dump_json, see the docs).

Reported per variant: CPU microseconds per stored row (the process: the loop's Python and chdb's
threads alike), rows/s of wall time, and a fingerprint of the stored model_calls and tool_calls
columns, which must be equal between the two variants (same values stored).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.measure import bench_dir
from fleetplane.accounting.bench import synthetic_events
from fleetplane.accounting.columnar import rows_of
from fleetplane.accounting.rows import COLUMNS, EVENTS, MODEL_CALLS, TOOL_CALLS
from fleetplane.accounting.schema import apply_ddl
from fleetplane.accounting.store import Store, connect
from fleetplane.core import events as ev
from fleetplane.core.serde import HEADER_LEN, Serde, default_serde
from fleetplane.core.settings import Settings

FLUSH = 20_000
SYNC = b"fleetplane-sync!"   # the object container's 16-byte sync marker
WRAPPER = [{"name": "_topic", "type": "string"}, {"name": "_partition", "type": "int"},
           {"name": "_offset", "type": "long"}, {"name": "_raw", "type": "bytes"},
           {"name": "_keep", "type": "boolean"}, {"name": "_first_call", "type": "int"},
           {"name": "_task_type", "type": "string"}]
PAYLOAD = {
    "ModelCall": ("model", "provider", "tier", "input_tokens", "output_tokens",
                  "cache_creation_input_tokens", "cache_read_input_tokens", "cost_usd",
                  "latency_ms", "outcome", "error", "stop_reason", "prev_hash"),
    "ToolCall": ("tool", "arguments", "outcome", "result_summary", "duration_ms", "prev_hash"),
}
HEAD = ("event_id", "task_id", "team", "occurred_at", "schema_version", "causation_id",
        "attempt", "call_index")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def zigzag(n: int) -> bytes:
    """An Avro int/long: zigzag, then base-128 varint."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n & ~0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def avro_string(s: str) -> bytes:
    b = s.encode()
    return zigzag(len(b)) + b


def _long(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return (result >> 1) ^ -(result & 1), pos
        shift += 7


def _string(buf: bytes, pos: int) -> tuple[str, int]:
    n, pos = _long(buf, pos)
    return buf[pos:pos + n].decode(), pos + n


def prefix(body: bytes) -> tuple[str, str, str, int, int, str, str]:
    """What the sink decides on for a ModelCall, read from the body's leading fields only:
    (event_id, task_id, team, attempt, call_index, model, tier)."""
    pos = HEADER_LEN
    event_id, pos = _string(body, pos)
    task_id, pos = _string(body, pos)
    team, pos = _string(body, pos)
    _at, pos = _long(body, pos)
    _version, pos = _long(body, pos)
    branch, pos = _long(body, pos)
    if branch:
        _cause, pos = _string(body, pos)
    attempt, pos = _long(body, pos)
    call_index, pos = _long(body, pos)
    model, pos = _string(body, pos)
    _provider, pos = _string(body, pos)
    tier, pos = _string(body, pos)
    return event_id, task_id, team, attempt, call_index, model, tier


def container(schema_json: str, records: list[bytes]) -> bytes:
    """One Avro object-container file: header, one block of `records`, sync marker."""
    meta = (zigzag(2) + avro_string("avro.schema") + avro_string(schema_json)
            + avro_string("avro.codec") + avro_string("null") + b"\x00")
    body = b"".join(records)
    return b"Obj\x01" + meta + SYNC + zigzag(len(records)) + zigzag(len(body)) + body + SYNC


def wrapper_schemas(schemas_dir: Path) -> dict[str, str]:
    out = {}
    for name in PAYLOAD:
        raw = json.loads((schemas_dir / f"{name}.avsc").read_text())
        raw["name"] = f"{name}Wrapped"
        raw["fields"] = WRAPPER + raw["fields"]
        out[name] = json.dumps(raw)
    return out


def store_python(store: Store, serde: Serde, chunk: list[tuple[int, bytes]]) -> int:
    rows: dict[str, list[Any]] = {EVENTS: [], MODEL_CALLS: [], TOOL_CALLS: []}
    for offset, body in chunk:
        name, d = serde.decode_record(body)
        event_row, fact, _ = rows_of(name, d, "audit", 0, offset, body)
        rows[EVENTS].append(event_row)
        assert fact is not None
        rows[fact[0]].append(fact[1])
    for table in (MODEL_CALLS, TOOL_CALLS, EVENTS):
        store.insert(table, rows[table], COLUMNS[table])
    return sum(len(v) for v in rows.values())


def store_sql(store: Store, wrappers: dict[str, str], chunk: list[tuple[int, bytes]],
              spool: Path, types: dict[str, str], model_fp: bytes) -> int:
    db = store.database
    by: dict[str, list[bytes]] = {"ModelCall": [], "ToolCall": []}
    seen: set[str] = set()
    for offset, body in chunk:
        head = avro_string("audit") + b"\x00" + zigzag(offset) + zigzag(len(body)) + body
        if body[2:HEADER_LEN] == model_fp:
            event_id, task_id, _team, attempt, call_index, _model, _tier = prefix(body)
            keep = event_id not in seen
            seen.add(event_id)
            first = int(attempt <= 1 and call_index == 0)
            by["ModelCall"].append(head + (b"\x01" if keep else b"\x00") + zigzag(first)
                                   + avro_string(types.get(task_id, "")) + body[HEADER_LEN:])
        else:
            by["ToolCall"].append(head + b"\x01\x00\x00" + body[HEADER_LEN:])
    stored = 0
    for name, records in by.items():
        if not records:
            continue
        path = spool / f"{name}.avro"
        path.write_bytes(container(wrappers[name], records))
        source = f"file('{path}', 'Avro')"
        payload = ("formatRowNoNewline('JSONEachRow', "
                   + ", ".join(HEAD + PAYLOAD[name]) + ")")
        if name == "ModelCall":
            store.command(
                f"INSERT INTO {db}.model_calls ({', '.join(COLUMNS[MODEL_CALLS])}) SELECT "
                "task_id, team, attempt, call_index, model, provider, tier, input_tokens, "
                "output_tokens, cache_creation_input_tokens, cache_read_input_tokens, cost_usd, "
                "latency_ms, outcome, ifNull(error, ''), ifNull(stop_reason, ''), occurred_at, "
                f"event_id, _task_type, _first_call FROM {source} WHERE _keep")
        else:
            store.command(
                f"INSERT INTO {db}.tool_calls ({', '.join(COLUMNS[TOOL_CALLS])}) SELECT "
                "task_id, team, attempt, call_index, tool, outcome, duration_ms, occurred_at, "
                f"event_id FROM {source}")
        store.command(
            f"INSERT INTO {db}.events ({', '.join(COLUMNS[EVENTS])}) SELECT event_id, "
            f"'{name}', task_id, team, occurred_at, schema_version, ifNull(causation_id, ''), "
            f"_topic, _partition, _offset, {payload}, _raw FROM {source} SETTINGS "
            "date_time_output_format = 'iso', output_format_json_escape_forward_slashes = 0, "
            "output_format_json_quote_64bit_integers = 0")
        stored += 2 * len(records)
    return stored


def fingerprint(store: Store) -> tuple[int, int]:
    db = store.database
    mc = ", ".join(c for c in COLUMNS[MODEL_CALLS] if c not in ("task_type", "first_call"))
    return (int(store.command(f"SELECT sum(cityHash64({mc})) FROM {db}.model_calls")),
            int(store.command(
                f"SELECT sum(cityHash64({', '.join(COLUMNS[TOOL_CALLS])})) FROM {db}.tool_calls")))


def payloads_parse_back(store: Store, events: dict[str, ev.Event]) -> tuple[int, int]:
    """(payloads read, payloads that validate into the very event that was encoded): what the
    audit replay (audit.entries_from_rows) needs of the `payload` column."""
    equal = total = 0
    for row in store.query(f"SELECT event_type, payload FROM {store.table(EVENTS)}"):
        total += 1
        event = ev.EVENT_TYPES[row["event_type"]].model_validate(json.loads(row["payload"]))
        equal += event == events[event.event_id]
    return total, equal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--dsn-dir", default="")
    args = parser.parse_args()
    serde = default_serde()
    model_fp = serde.schemas.current["ModelCall"].fingerprint
    events = [e for e in synthetic_events(args.tasks, prefix=f"sd{time.monotonic_ns()}")
              if isinstance(e, ev.ModelCall | ev.ToolCall)]
    bodies = list(enumerate(serde.encode(e) for e in events))
    types = {e.task_id: "refactor" for e in events}
    base = Path(args.dsn_dir) if args.dsn_dir else bench_dir("fleetplane-sink-decode-")
    spool = Path(tempfile.mkdtemp(prefix="fleetplane-avro-", dir="/dev/shm"
                                  if os.path.isdir("/dev/shm") else None))
    store = connect(Settings(clickhouse_dsn=f"chdb://{base}", clickhouse_database="sink_decode"))
    apply_ddl(store)
    wrappers = wrapper_schemas(Settings().schemas_dir)
    results: dict[str, list[dict[str, Any]]] = {"python": [], "sql": []}
    for r in range(args.rounds):
        for mode in ("python", "sql") if r % 2 == 0 else ("sql", "python"):
            for table in (EVENTS, MODEL_CALLS, TOOL_CALLS):
                store.command(f"TRUNCATE TABLE {store.table(table)}")
            cpu, wall, rows = cpu_seconds(), time.perf_counter(), 0
            for start in range(0, len(bodies), FLUSH):
                chunk = bodies[start:start + FLUSH]
                rows += (store_python(store, serde, chunk) if mode == "python"
                         else store_sql(store, wrappers, chunk, spool, types, model_fp))
            cpu, wall = cpu_seconds() - cpu, time.perf_counter() - wall
            out = {"us_cpu_per_row": 1e6 * cpu / rows, "rows_per_s": rows / wall, "rows": rows,
                   "fingerprint": fingerprint(store), "load_avg": os.getloadavg()[0]}
            if mode == "sql" and r == 0:
                out["payloads_read_equal"] = payloads_parse_back(
                    store, {e.event_id: e for e in events})
                print("payloads (read, validating into the encoded event):",
                      out["payloads_read_equal"])
            results[mode].append(out)
            print(f"{mode:6} {out['us_cpu_per_row']:5.2f} us CPU per row, "
                  f"{out['rows_per_s']:9,.0f} rows/s, {rows:,} rows, load "
                  f"{out['load_avg']:.1f}, fingerprint {out['fingerprint']}", flush=True)
    store.close()
    shutil.rmtree(spool, ignore_errors=True)
    for mode, runs in results.items():
        print(f"{mode}: median {statistics.median(x['us_cpu_per_row'] for x in runs):.2f} us "
              f"CPU per row, {statistics.median(x['rows_per_s'] for x in runs):,.0f} rows/s")
    same = {json.dumps(x["fingerprint"]) for runs in results.values() for x in runs}
    print("stored values equal between the variants:", len(same) == 1)
    path = Path(__file__).resolve().parent / "results" / \
        f"sink-decode-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    print(f"written {path}")


if __name__ == "__main__":
    main()
