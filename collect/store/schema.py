"""The tables, in each database's dialect (one schema, see the package docstring)."""

_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS fieldscope_schema (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS identifications (
    id INTEGER PRIMARY KEY,
    device TEXT NOT NULL,
    station TEXT NOT NULL,
    seq INTEGER NOT NULL,
    captured_at TEXT NOT NULL,
    received_at TEXT NOT NULL,
    status TEXT NOT NULL,
    label TEXT,
    score REAL,
    top_k TEXT NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    image_sha256 TEXT NOT NULL,
    image_width INTEGER NOT NULL,
    image_height INTEGER NOT NULL,
    archived_path TEXT,
    quality_sharpness REAL,
    quality_exposure REAL,
    reason TEXT,
    capture_ms REAL NOT NULL,
    quality_ms REAL NOT NULL,
    preprocess_ms REAL NOT NULL,
    inference_ms REAL NOT NULL,
    total_ms REAL NOT NULL,
    message_version INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    payload_sha256 TEXT NOT NULL,
    UNIQUE (device, seq)
);
CREATE INDEX IF NOT EXISTS identifications_captured_at ON identifications (captured_at);
CREATE INDEX IF NOT EXISTS identifications_station ON identifications (station, captured_at);
CREATE INDEX IF NOT EXISTS identifications_label ON identifications (label, captured_at);
CREATE TABLE IF NOT EXISTS invalid_messages (
    id INTEGER PRIMARY KEY,
    received_at TEXT NOT NULL,
    topic TEXT NOT NULL,
    kind TEXT,
    reason TEXT NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY,
    station TEXT NOT NULL,
    status TEXT,
    status_at TEXT,
    heartbeat_at TEXT,
    heartbeat_received_at TEXT,
    heartbeat TEXT,
    outbox_depth INTEGER,
    model_name TEXT,
    model_version TEXT,
    model_sha256 TEXT,
    model_info TEXT,
    updated_at TEXT NOT NULL
);
"""

_POSTGRES_SCHEMA = """
CREATE TABLE IF NOT EXISTS fieldscope_schema (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS identifications (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device TEXT NOT NULL,
    station TEXT NOT NULL,
    seq BIGINT NOT NULL,
    captured_at TIMESTAMPTZ NOT NULL,
    received_at TIMESTAMPTZ NOT NULL,
    status TEXT NOT NULL,
    label TEXT,
    score DOUBLE PRECISION,
    top_k JSONB NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    image_sha256 TEXT NOT NULL,
    image_width INTEGER NOT NULL,
    image_height INTEGER NOT NULL,
    archived_path TEXT,
    quality_sharpness DOUBLE PRECISION,
    quality_exposure DOUBLE PRECISION,
    reason TEXT,
    capture_ms DOUBLE PRECISION NOT NULL,
    quality_ms DOUBLE PRECISION NOT NULL,
    preprocess_ms DOUBLE PRECISION NOT NULL,
    inference_ms DOUBLE PRECISION NOT NULL,
    total_ms DOUBLE PRECISION NOT NULL,
    message_version INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BYTEA NOT NULL,
    payload_sha256 TEXT NOT NULL,
    UNIQUE (device, seq)
);
CREATE INDEX IF NOT EXISTS identifications_captured_at ON identifications (captured_at);
CREATE INDEX IF NOT EXISTS identifications_station ON identifications (station, captured_at);
CREATE INDEX IF NOT EXISTS identifications_label ON identifications (label, captured_at);
CREATE TABLE IF NOT EXISTS invalid_messages (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at TIMESTAMPTZ NOT NULL,
    topic TEXT NOT NULL,
    kind TEXT,
    reason TEXT NOT NULL,
    payload BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY,
    station TEXT NOT NULL,
    status TEXT,
    status_at TIMESTAMPTZ,
    heartbeat_at TIMESTAMPTZ,
    heartbeat_received_at TIMESTAMPTZ,
    heartbeat JSONB,
    outbox_depth BIGINT,
    model_name TEXT,
    model_version TEXT,
    model_sha256 TEXT,
    model_info JSONB,
    updated_at TIMESTAMPTZ NOT NULL
);
"""
