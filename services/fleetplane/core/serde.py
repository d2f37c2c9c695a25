"""Avro single-object encoding (Avro spec: 0xC3 0x01, 8-byte CRC-64-AVRO fingerprint, body).

Without a schema registry this is the wire format of every fleetplane topic; the fingerprint tells
the reader which writer schema (and so which event type) a record holds, so one topic can carry
several event types. Records written with an older schema version are resolved into the current
schema (schema evolution: fields are only ever added, with defaults).
"""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path
from typing import Any

from fastavro import schemaless_reader, schemaless_writer

from fleetplane.core.errors import NotRetriable
from fleetplane.core.events import EVENT_TYPES, Event, trusted
from fleetplane.core.schemas import SchemaSet, load_schema_set

MAGIC = b"\xc3\x01"
HEADER_LEN = 10


class DecodeError(NotRetriable):
    """The bytes are not a fleetplane event this reader can decode."""


class Serde:
    def __init__(self, schemas: SchemaSet) -> None:
        self.schemas = schemas
        missing = set(EVENT_TYPES) - set(schemas.current)
        if missing:
            raise RuntimeError(f"no Avro schema for event types: {sorted(missing)}")

    def encode(self, event: Event) -> bytes:
        entry = self.schemas.current[type(event).__name__]
        buf = io.BytesIO()
        buf.write(MAGIC)
        buf.write(entry.fingerprint)
        schemaless_writer(buf, entry.parsed, event.model_dump())
        return buf.getvalue()

    def decode_record(self, data: bytes) -> tuple[str, dict[str, Any]]:
        """Decode to (event type name, field dict) using the current schema as reader."""
        if len(data) < HEADER_LEN or data[:2] != MAGIC:
            raise DecodeError("not Avro single-object encoded (missing C3 01 marker)")
        writer = self.schemas.by_fingerprint.get(data[2:HEADER_LEN])
        if writer is None:
            raise DecodeError(f"unknown schema fingerprint {data[2:HEADER_LEN].hex()}")
        reader = self.schemas.current.get(writer.name)
        if reader is None:
            raise DecodeError(f"schema {writer.name} is not a current event type")
        try:
            # same schema on both sides: skip schema resolution (the common, fast case)
            record = schemaless_reader(
                io.BytesIO(data[HEADER_LEN:]), writer.parsed,
                None if reader is writer else reader.parsed,
            )
        except Exception as exc:  # fastavro raises many types on corrupt bodies
            raise DecodeError(f"corrupt {writer.name} body: {exc}") from exc
        if not isinstance(record, dict):
            raise DecodeError(f"{writer.name} body is not a record")
        return writer.name, record

    def decode(self, data: bytes) -> Event:
        """The event, decoded once: Avro checked every field's type against the writer's
        schema, so the model is built without a second validation (events.trusted)."""
        name, record = self.decode_record(data)
        cls = EVENT_TYPES[name]
        try:
            return trusted(cls, record)
        except Exception as exc:
            raise DecodeError(f"{name} does not decode: {exc}") from exc

    def decode_validated(self, data: bytes) -> Event:
        """decode() with pydantic's validation on top (what decode did before; tests compare
        the two)."""
        name, record = self.decode_record(data)
        cls = EVENT_TYPES[name]
        try:
            return cls.model_validate(record)
        except Exception as exc:
            raise DecodeError(f"{name} does not validate: {exc}") from exc


@lru_cache(maxsize=4)
def serde_for(schemas_dir: Path) -> Serde:
    return Serde(load_schema_set(schemas_dir))


def default_serde() -> Serde:
    from fleetplane.core.settings import get_settings

    return serde_for(get_settings().schemas_dir)
