"""The tables, in each database's dialect (one schema, see the package docstring).

The schema is written once, with ``{id}``, ``{bigint}``, ``{real}``, ``{time}``,
``{json}`` and ``{blob}`` where SQLite and PostgreSQL name a column type differently:
:func:`in_dialect` fills them in, so a new column cannot be added to one dialect only.
"""

from collections.abc import Mapping

_COLUMN_TYPES: Mapping[str, Mapping[str, str]] = {
    "sqlite": {
        "id": "INTEGER PRIMARY KEY",
        "bigint": "INTEGER",
        "real": "REAL",
        "time": "TEXT",
        "json": "TEXT",
        "blob": "BLOB",
    },
    "postgres": {
        "id": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
        "bigint": "BIGINT",
        "real": "DOUBLE PRECISION",
        "time": "TIMESTAMPTZ",
        "json": "JSONB",
        "blob": "BYTEA",
    },
}


def in_dialect(ddl: str, dialect: str) -> str:
    """``ddl`` with its column type placeholders in ``dialect`` (``sqlite`` or ``postgres``)."""
    return ddl.format_map(_COLUMN_TYPES[dialect])


_SCHEMA = """
CREATE TABLE IF NOT EXISTS fieldscope_schema (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS identifications (
    id {id},
    device TEXT NOT NULL,
    station TEXT NOT NULL,
    seq {bigint} NOT NULL,
    captured_at {time} NOT NULL,
    received_at {time} NOT NULL,
    status TEXT NOT NULL,
    label TEXT,
    score {real},
    top_k {json} NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    image_sha256 TEXT NOT NULL,
    image_width INTEGER NOT NULL,
    image_height INTEGER NOT NULL,
    archived_path TEXT,
    quality_sharpness {real},
    quality_exposure {real},
    reason TEXT,
    capture_ms {real} NOT NULL,
    quality_ms {real} NOT NULL,
    preprocess_ms {real} NOT NULL,
    inference_ms {real} NOT NULL,
    total_ms {real} NOT NULL,
    message_version INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload {blob} NOT NULL,
    payload_sha256 TEXT NOT NULL,
    UNIQUE (device, seq)
);
CREATE INDEX IF NOT EXISTS identifications_captured_at ON identifications (captured_at);
CREATE INDEX IF NOT EXISTS identifications_station ON identifications (station, captured_at);
CREATE INDEX IF NOT EXISTS identifications_label ON identifications (label, captured_at);
CREATE TABLE IF NOT EXISTS invalid_messages (
    id {id},
    received_at {time} NOT NULL,
    topic TEXT NOT NULL,
    kind TEXT,
    reason TEXT NOT NULL,
    payload {blob} NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY,
    station TEXT NOT NULL,
    status TEXT,
    status_at {time},
    heartbeat_at {time},
    heartbeat_received_at {time},
    heartbeat {json},
    outbox_depth {bigint},
    model_name TEXT,
    model_version TEXT,
    model_sha256 TEXT,
    model_info {json},
    updated_at {time} NOT NULL
);
"""

_SQLITE_SCHEMA = in_dialect(_SCHEMA, "sqlite")
_POSTGRES_SCHEMA = in_dialect(_SCHEMA, "postgres")
