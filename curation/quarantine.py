"""The quarantine: where refused rows go, whole, with the reason and the stage that refused them.

A quarantined row is stored as JSON (``record_format='json'``; bytes become ``{"$base64": ...}`` so
images survive) or, when the input could not even be parsed, as the raw input bytes
(``record_format='raw'``). ``decode_record`` turns a JSON record back into the row.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import pyarrow as pa

from assay.curation.schema import QUARANTINE_SCHEMA


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$base64": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return {"$float": repr(value)}
    if isinstance(value, str):
        # A string holding invalid UTF-8 (read without validation) is kept byte for byte.
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return {"$base64": base64.b64encode(value.encode("utf-8", "surrogateescape")).decode()}
    return value


def encode_record(row: dict[str, Any]) -> bytes:
    return json.dumps(_jsonable(row), ensure_ascii=False, sort_keys=True).encode("utf-8")


def _restore(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$base64"}:
            return base64.b64decode(value["$base64"])
        if set(value) == {"$float"}:
            return float(value["$float"])
        return {k: _restore(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore(v) for v in value]
    return value


def decode_record(record: bytes) -> dict[str, Any]:
    """The row a JSON quarantine record holds (bytes restored)."""
    return _restore(json.loads(record.decode("utf-8")))


class QuarantineBuilder:
    """Collects refused rows of one shard and builds the quarantine table."""

    def __init__(self, table: str, stage: str, source: str):
        self.table = table
        self.stage = stage
        self.source = source
        self.rows: list[dict[str, Any]] = []

    def add(
        self,
        row: dict[str, Any],
        reason: str,
        detail: str = "",
        *,
        id: str | None = None,
        location: str | None = None,
    ) -> None:
        self.rows.append(
            {
                "table": self.table,
                "id": id,
                "reason": reason,
                "detail": detail,
                "stage": self.stage,
                "source": location or self.source,
                "record_format": "json",
                "record": encode_record(row),
            }
        )

    def add_raw(self, raw: bytes, reason: str, detail: str = "", *, location: str | None = None) -> None:
        self.rows.append(
            {
                "table": self.table,
                "id": None,
                "reason": reason,
                "detail": detail,
                "stage": self.stage,
                "source": location or self.source,
                "record_format": "raw",
                "record": bytes(raw),
            }
        )

    def __len__(self) -> int:
        return len(self.rows)

    def to_table(self) -> pa.Table:
        return pa.Table.from_pylist(self.rows, schema=QUARANTINE_SCHEMA)
