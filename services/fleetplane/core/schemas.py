"""Load the Avro schemas in schemas/ and index them by name and by fingerprint.

The named types in schemas/types/ are loaded first so event schemas can refer to them.
Older versions of a schema live in schemas/history/<Name>.v<N>.avsc, self-contained (named types
inlined as they were then): their fingerprints stay decodable (writer schema) and are resolved
into the current schema (reader schema).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastavro import parse_schema
from fastavro.schema import fingerprint, to_parsing_canonical_form


@dataclass(frozen=True)
class SchemaEntry:
    name: str
    parsed: Any
    fingerprint: bytes  # 8 bytes, little-endian CRC-64-AVRO as written in single-object encoding


@dataclass
class SchemaSet:
    current: dict[str, SchemaEntry] = field(default_factory=dict)
    by_fingerprint: dict[bytes, SchemaEntry] = field(default_factory=dict)

    def add(self, raw: dict[str, Any], named: dict[str, Any], *, current: bool) -> SchemaEntry:
        parsed = parse_schema(raw, named_schemas=dict(named))
        canonical = to_parsing_canonical_form(parsed)
        fp = int(fingerprint(canonical, "CRC-64-AVRO"), 16).to_bytes(8, "little")
        entry = SchemaEntry(name=str(raw["name"]), parsed=parsed, fingerprint=fp)
        self.by_fingerprint[fp] = entry
        if current:
            self.current[entry.name] = entry
        return entry


def _read(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a schema file must hold one record schema")
    return data


def load_schema_set(schemas_dir: Path) -> SchemaSet:
    named: dict[str, Any] = {}
    for path in sorted((schemas_dir / "types").glob("*.avsc")):
        parse_schema(_read(path), named_schemas=named)
    result = SchemaSet()
    for path in sorted(schemas_dir.glob("*.avsc")):
        result.add(_read(path), named, current=True)
    history = schemas_dir / "history"
    if history.is_dir():
        for path in sorted(history.glob("*.avsc")):
            result.add(_read(path), {}, current=False)
    return result
