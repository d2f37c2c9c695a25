"""Avro single-object encoding (Avro spec: 0xC3 0x01, 8-byte CRC-64-AVRO fingerprint, body).

Without a schema registry this is the wire format of every fleetplane topic; the fingerprint tells
the reader which writer schema (and so which event type) a record holds, so one topic can carry
several event types. Records written with an older schema version are resolved into the current
schema (schema evolution: fields are only ever added, with defaults).

Decoding: a record written with the current schema (nearly all of them) is decoded by cavro, a
Cython Avro codec that reads the same bytes into the same field dicts as fastavro about twice as
fast (8.2 against 4.2 us per event over a task's lifecycle; tests/unit/test_serde.py compares
the two for every event type). fastavro stays the encoder and the reader of older writers
(schema resolution), and decodes any type whose schema cavro would read differently (checked
when the Serde is built, 4 ms for the 24 schemas: the parsing canonical forms must agree), or
everything with settings.avro_fast_decode off.
"""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path
from typing import Any

import cavro
from fastavro import schemaless_reader, schemaless_writer
from fastavro.schema import expand_schema, to_parsing_canonical_form

from fleetplane.core.errors import NotRetriable
from fleetplane.core.events import EVENT_TYPES, Event, trusted
from fleetplane.core.logging import get_logger
from fleetplane.core.schemas import SchemaEntry, SchemaSet, load_schema_set

log = get_logger(__name__)

MAGIC = b"\xc3\x01"
HEADER_LEN = 10


class DecodeError(NotRetriable):
    """The bytes are not a fleetplane event this reader can decode."""


# Records decode to plain dicts, as fastavro's.
_CAVRO = cavro.DEFAULT_OPTIONS.replace(record_decodes_to_dict=True)


def _plain(schema: Any) -> Any:
    """A fastavro-parsed schema without fastavro's bookkeeping keys (`__fastavro_parsed`...)."""
    if isinstance(schema, dict):
        return {k: _plain(v) for k, v in schema.items() if not k.startswith("__")}
    if isinstance(schema, list):
        return [_plain(v) for v in schema]
    return schema


def fast_decoder(entry: SchemaEntry) -> Any | None:
    """cavro's decoder for `entry`'s schema (named types inlined), or None when cavro would read
    other bytes than fastavro: the two must give the same parsing canonical form (the schema's
    structure, which decides how bytes are read). Not the fingerprint: the wire's fingerprints
    are fastavro's canonical form of the schema with its named types as references."""
    try:
        expanded = expand_schema(entry.parsed)
        schema = cavro.Schema(_plain(expanded), options=_CAVRO)
        ok = schema.canonical_form == to_parsing_canonical_form(expanded)
    except Exception:
        log.warning("cavro cannot read this schema; fastavro decodes it", schema=entry.name,
                    exc_info=True)
        return None
    if not ok:
        log.warning("cavro reads this schema differently; fastavro decodes it",
                    schema=entry.name)
        return None
    return schema


class Serde:
    def __init__(self, schemas: SchemaSet, *, fast_decode: bool = True) -> None:
        self.schemas = schemas
        missing = set(EVENT_TYPES) - set(schemas.current)
        if missing:
            raise RuntimeError(f"no Avro schema for event types: {sorted(missing)}")
        # current schema -> its cavro decoder (the common case: writer schema = reader schema);
        # none with fast_decode off (settings.avro_fast_decode): fastavro decodes everything
        self.fast: dict[bytes, Any] = {}
        for entry in schemas.current.values() if fast_decode else ():
            decoder = fast_decoder(entry)
            if decoder is not None:
                self.fast[entry.fingerprint] = decoder

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
        fast = self.fast.get(writer.fingerprint) if reader is writer else None
        try:
            if fast is not None:   # same schema on both sides: the common, fast case
                record = fast.binary_decode(data[HEADER_LEN:])
            else:
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
def serde_for(schemas_dir: Path, fast_decode: bool = True) -> Serde:
    return Serde(load_schema_set(schemas_dir), fast_decode=fast_decode)


def default_serde() -> Serde:
    from fleetplane.core.settings import get_settings

    settings = get_settings()
    return serde_for(settings.schemas_dir, settings.avro_fast_decode)
