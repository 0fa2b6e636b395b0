"""``fieldscope collect``: run the subscriber, export what it stored, serve the dashboard.

    fieldscope collect --broker HOST[:PORT] [--db URL] [--topic-prefix P]   (same as `run`)
    fieldscope collect run --broker HOST[:PORT] ...
    fieldscope collect export --db URL --format csv|parquet|darwin-core|ecotaxa --out FILE
        [--taxa taxa.csv|BUNDLE] [--metadata dataset.toml] [--media-base-url URL]
    fieldscope collect export --db URL --format folders --out NEW_DIR --archive DIR
    fieldscope collect serve --db URL [--port 8080] [--bundle DIR ...] [--archive DIR]
                             [--images DIR]
                             [--host ADDR --auth-file FILE]

Handlers import their modules lazily so ``fieldscope --help`` stays instant.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["register"]

PASSWORD_ENV = "FIELDSCOPE_MQTT_PASSWORD"
SESSION_EXPIRY_S = 7 * 24 * 3600
DEFAULT_DB = "fieldscope-collect.sqlite"


class _ExportFormats:
    """The export registry's format names (the one list of them), read only when
    argparse checks or prints ``--format``: ``fieldscope --help`` imports no store."""

    def _names(self) -> tuple[str, ...]:
        from fieldscope.collect.export.registry import FORMATS

        return FORMATS

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())


def register(subparsers: Any) -> None:
    """Add ``collect`` and its actions to the ``fieldscope`` parser."""
    p = subparsers.add_parser(
        "collect",
        help="subscribe to the fleet and store identifications; export; dashboard",
        description="Without an action (or with `run`): subscribe to every device's "
        "identifications, status, heartbeats and model info and store them, once each, "
        "in SQLite or PostgreSQL. `export` writes CSV, Parquet, Darwin Core or EcoTaxa "
        "files, or the reviewed images as class folders; `serve` runs the web dashboard.",
    )
    _run_arguments(p, required=False)
    p.set_defaults(handler=_run)
    actions = p.add_subparsers(dest="collect_action", metavar="ACTION")
    actions.required = False

    _add_run(actions)
    _add_export(actions)
    _add_gaps(actions)
    _add_serve(actions)


def _add_run(actions: Any) -> None:
    r = actions.add_parser(
        "run",
        help="subscribe and store (the default action)",
        description="Subscribe with a persistent MQTT session (5 by default, or 3.1.1) and "
        "store every message "
        "once; a message is acknowledged to the broker only after it is committed. "
        f"The broker password is read from --password-file, else ${PASSWORD_ENV}. "
        "Stop with Ctrl-C or SIGTERM.",
    )
    _run_arguments(r, required=True)
    r.set_defaults(handler=_run)


def _add_export(actions: Any) -> None:
    e = actions.add_parser(
        "export",
        help="write stored identifications as CSV, Parquet, Darwin Core or EcoTaxa TSV, "
        "or the reviewed images as class folders",
        description="Darwin Core: occurrence records of labelled identifications "
        "(an .zip output is a Darwin Core Archive, with eml.xml from --metadata); the "
        "latest review of each decides. EcoTaxa: an import .zip (TSV and images, with "
        "--archive) or the TSV alone. "
        "folders: the reviewed images in one folder per validated label, with a "
        "manifest.csv (training data for the next model; needs --archive). "
        "Times are UTC; a date or time without an offset is UTC.",
    )
    e.add_argument("--db", default=DEFAULT_DB, help=f"database URL or file (default {DEFAULT_DB})")
    e.add_argument(
        "--format",
        required=True,
        choices=_ExportFormats(),
        metavar="FORMAT",
        help="one of %(choices)s",
        dest="fmt",
    )
    e.add_argument(
        "--out", type=Path, required=True, help="the file to write (folders: a new folder)"
    )
    _filter_arguments(e)
    e.add_argument(
        "--id-prefix",
        default="fieldscope",
        help="Darwin Core occurrenceID prefix: {prefix}:{device}:{seq} (default fieldscope)",
    )
    e.add_argument(
        "--media-url-prefix",
        help="Darwin Core associatedMedia: URL under which the archives are published "
        "({prefix}/{station}/{device}/{day}/{file})",
    )
    e.add_argument("--dataset-name", default="", help="Darwin Core datasetName")
    e.add_argument(
        "--archive",
        type=Path,
        help="folders, and ecotaxa with a .zip --out: the copies of the stations' image "
        "archives (as for collect serve)",
    )
    _taxonomy_arguments(e)
    e.add_argument(
        "--not-a-taxon-folder",
        action="store_true",
        help="folders: put images reviewed as 'not a taxon' in _not_a_taxon/ (default: leave out)",
    )
    e.set_defaults(handler=_export)


def _taxonomy_arguments(e: argparse.ArgumentParser) -> None:
    e.add_argument(
        "--taxa",
        type=Path,
        metavar="CSV_OR_BUNDLE",
        help="darwin-core, ecotaxa: taxa.csv (label, scientificName, taxonRank, kingdom, "
        "is_taxon, aphiaID, gbifKey), or a bundle folder whose manifest carries taxa; "
        "without it the labels are used as names",
    )
    e.add_argument(
        "--metadata",
        type=Path,
        metavar="TOML",
        help="darwin-core (.zip): dataset.toml with title, licence (CC0, CC-BY, CC-BY-NC), "
        "abstract, [creator] and [contact] name/email/organisation; written as eml.xml",
    )
    e.add_argument(
        "--media-base-url",
        metavar="URL",
        help="darwin-core: the dashboard's address; associatedMedia becomes its image URL "
        "({url}/preview/{id}) instead of the station's path",
    )


def _add_gaps(actions: Any) -> None:
    g = actions.add_parser(
        "gaps",
        help="list identifications lost on the way: gaps in each device's seq",
        description="Each device numbers its identifications (seq, one more each); a gap "
        "between two stored ones means the ones between never arrived (a broker that lost "
        "its queue, a queue limit, a station outbox that dropped its oldest). A gap closes "
        "when the missing ones arrive late. Exit status 0 without gaps, 1 with gaps.",
    )
    g.add_argument("--db", default=DEFAULT_DB, help=f"database URL or file (default {DEFAULT_DB})")
    g.add_argument("--device", action="append", default=[], help="only this device (repeatable)")
    g.add_argument(
        "--limit", type=int, default=1000, help="list at most this many gaps (default 1000)"
    )
    g.set_defaults(handler=_gaps)


def _add_serve(actions: Any) -> None:
    """``collect serve``: the dashboard's options."""
    s = actions.add_parser(
        "serve",
        help="web dashboard: fleet, identifications, chart, try a model",
        description="Serve the dashboard and its JSON API (/api/v1) over the collector's "
        "database. Binds 127.0.0.1 unless --host says otherwise; any other address needs "
        "--auth-file, whose tokens the upload endpoints then require.",
    )
    s.add_argument("--db", default=DEFAULT_DB, help=f"database URL or file (default {DEFAULT_DB})")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    s.add_argument(
        "--bundle",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="a model bundle offered on the upload page (repeatable)",
    )
    s.add_argument("--public-key", type=Path, help="verify the bundles' signatures with this key")
    _image_folder_arguments(s)
    s.add_argument(
        "--max-upload-mb", type=float, default=20.0, help="largest upload accepted (default 20)"
    )
    s.add_argument(
        "--stale-after",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="flag devices whose last heartbeat is older (default 300)",
    )
    s.add_argument(
        "--auth-file",
        type=Path,
        metavar="FILE",
        help="tokens for uploads: one token, or lines of user:token (required with a --host "
        "other than loopback); clients send Authorization: Bearer TOKEN, browsers log in",
    )
    s.set_defaults(handler=_serve)


def _image_folder_arguments(s: argparse.ArgumentParser) -> None:
    """Where ``serve`` finds images: the image store first, then archive copies."""
    s.add_argument(
        "--archive",
        type=Path,
        help="folder with copies of the stations' image archives, for thumbnails "
        "(ARCHIVE/STATION/DEVICE/DAY/FILE, ARCHIVE/DEVICE/DAY/FILE or ARCHIVE/DAY/FILE)",
    )
    s.add_argument(
        "--images",
        type=Path,
        metavar="DIR",
        help="the image folder `collect run --images` fills: thumbnails and review images "
        "come from there first (then from --archive)",
    )


def _run_arguments(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument(
        "--broker", required=required, metavar="HOST[:PORT]", help="MQTT broker (port 1883)"
    )
    p.add_argument("--db", default=DEFAULT_DB, help=f"database URL or file (default {DEFAULT_DB})")
    p.add_argument("--topic-prefix", default="fieldscope", help="topic prefix (default fieldscope)")
    p.add_argument(
        "--client-id",
        help="MQTT client id; stable across restarts and unique per running collector "
        "(default fieldscope-collect-HOSTNAME)",
    )
    p.add_argument(
        "--share-group",
        help="take identifications through $share/GROUP/... so several collectors split them",
    )
    _broker_arguments(p)
    p.add_argument(
        "--images",
        type=Path,
        metavar="DIR",
        help="keep the images stations publish ([upload] in edge.toml) in DIR, by SHA-256",
    )
    p.add_argument(
        "--image-max-mb",
        type=float,
        default=16.0,
        help="refuse (and count) images larger than this (default 16)",
    )
    p.add_argument(
        "--durable",
        action="store_true",
        help="SQLite synchronous=FULL: also survive a power cut of this host (slower)",
    )


def _broker_arguments(p: argparse.ArgumentParser) -> None:
    """The connection options, those of the station's ``[mqtt]`` section."""
    p.add_argument(
        "--protocol",
        choices=("5", "3.1.1"),
        default="5",
        help="MQTT version (default 5; 3.1.1 for brokers without MQTT 5, with a persistent "
        "session that never expires)",
    )
    p.add_argument(
        "--session-expiry",
        type=int,
        default=SESSION_EXPIRY_S,
        metavar="SECONDS",
        help="how long the broker keeps messages for a stopped collector (default 7 days)",
    )
    p.add_argument(
        "--username",
        help=f"broker user name (password from --password-file, else ${PASSWORD_ENV})",
    )
    p.add_argument(
        "--password-file",
        type=Path,
        metavar="FILE",
        help="read the broker password from the first line of FILE (e.g. a systemd credential)",
    )
    p.add_argument("--tls", action="store_true", help="use TLS, trusting the system's CAs")
    p.add_argument("--ca-file", type=Path, help="use TLS, trusting this CA file")
    p.add_argument(
        "--tls-cert",
        type=Path,
        metavar="PEM",
        help="use TLS and authenticate with this client certificate (with --tls-key)",
    )
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="the client certificate's key")
    p.add_argument(
        "--tls-insecure",
        action="store_true",
        help="use TLS without checking the broker's host name (the chain is still verified)",
    )


def _filter_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--station", action="append", default=[], help="only this station (repeatable)")
    p.add_argument("--device", action="append", default=[], help="only this device (repeatable)")
    p.add_argument("--label", action="append", default=[], help="only this label (repeatable)")
    p.add_argument(
        "--sample",
        action="append",
        default=[],
        help="only this sample id, as the station's sample command started it (repeatable)",
    )
    p.add_argument(
        "--status",
        action="append",
        default=[],
        choices=("ok", "uncertain", "rejected"),
        help="only this status (repeatable)",
    )
    p.add_argument("--since", help="captured at or after (e.g. 2026-11-01 or 2026-11-01T06:00Z)")
    p.add_argument("--until", help="captured before")


def _broker(text: str | None) -> tuple[str, int]:
    from fieldscope.edge.errors import ConfigError

    if not text:
        raise ConfigError("--broker HOST[:PORT] is required (e.g. --broker localhost:1883)")
    host, sep, port_text = text.rpartition(":")
    if not sep or "]" in port_text:
        return text.strip("[]"), 1883
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"--broker {text!r}: the port must be a number 1-65535")
    if not host:
        raise ConfigError(f"--broker {text!r} has no host name")
    return host.strip("[]"), int(port_text)


def _collector_settings(args: argparse.Namespace) -> Any:
    """The collector's settings from its options; the password is read when connecting."""
    from fieldscope.collect.subscriber import CollectorSettings, default_client_id
    from fieldscope.edge.broker import BrokerSettings, MqttProtocol, TlsSettings, read_password

    host, port = _broker(args.broker)
    tls_files = (args.ca_file, args.tls_cert, args.tls_key)
    tls = args.tls or args.tls_insecure or any(f is not None for f in tls_files)
    from_env = args.username and not args.password_file and os.environ.get(PASSWORD_ENV)
    broker = BrokerSettings(
        host=host,
        port=port,
        prefix=args.topic_prefix,
        client_id=args.client_id or default_client_id(),
        username=args.username,
        password_env=PASSWORD_ENV if from_env else None,
        password_file=args.password_file,
        tls=TlsSettings(
            ca=args.ca_file, cert=args.tls_cert, key=args.tls_key, insecure=args.tls_insecure
        )
        if tls
        else None,
        keepalive=30,
        protocol=MqttProtocol(args.protocol),
        session_expiry_s=args.session_expiry,
        reconnect_backoff_s=(1.0, 30.0),
    )
    settings = CollectorSettings(broker=broker, share_group=args.share_group)
    settings.check()
    read_password(broker, "broker")  # an unreadable --password-file fails before anything
    return settings


def _run(args: argparse.Namespace) -> int:
    from fieldscope.collect.store import open_store
    from fieldscope.collect.subscriber import Collector
    from fieldscope.edge.broker import describe

    settings = _collector_settings(args)
    images = _image_store(args)
    store = open_store(args.db, durable=args.durable)
    try:
        collector = Collector(settings, store, images)
    except BaseException:
        store.close()
        raise
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        collector.start()
        print(
            f"collecting from {describe(settings.broker)}, prefix {settings.broker.prefix}, "
            f"into {store.url}; Ctrl-C to stop",
            file=sys.stderr,
        )
        while not stop.wait(1.0):
            pass
    finally:
        collector.stop()
        store.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"stopped: {collector.stats.line()}", file=sys.stderr)
    if images is not None:
        print(f"{images.counts.line()} (in {images.root})", file=sys.stderr)
    return 0


def _image_store(args: argparse.Namespace) -> Any:
    """The image store ``--images`` asks for, or None."""
    from fieldscope.collect.images import ImageStore
    from fieldscope.edge.errors import ConfigError

    if args.images is None:
        return None
    if not 0 < args.image_max_mb <= 1024:
        raise ConfigError(f"--image-max-mb must be > 0 and <= 1024, got {args.image_max_mb}")
    return ImageStore(args.images, max_bytes=int(args.image_max_mb * 1024 * 1024))


def _filters(args: argparse.Namespace) -> Any:
    from fieldscope.collect.export import parse_time
    from fieldscope.collect.store import Filters

    return Filters(
        stations=tuple(args.station),
        devices=tuple(args.device),
        labels=tuple(args.label),
        statuses=tuple(args.status),
        samples=tuple(args.sample),
        since=None if args.since is None else parse_time(args.since, "--since"),
        until=None if args.until is None else parse_time(args.until, "--until"),
    )


def _export(args: argparse.Namespace) -> int:
    from fieldscope.collect.export import export
    from fieldscope.collect.export.eml import read_metadata
    from fieldscope.collect.export.taxonomy import load_taxa
    from fieldscope.collect.store import open_store

    filters = _filters(args)
    taxa = None if args.taxa is None else load_taxa(args.taxa)
    metadata = None if args.metadata is None else read_metadata(args.metadata)
    with open_store(args.db, create=False) as store:
        summary = export(
            store,
            args.fmt,
            args.out,
            filters,
            id_prefix=args.id_prefix,
            media_url_prefix=args.media_url_prefix,
            dataset_name=args.dataset_name,
            progress=lambda n: print(f"  {n:,} rows...", file=sys.stderr),
            archive=args.archive,
            not_a_taxon=args.not_a_taxon_folder,
            taxa=taxa,
            media_base_url=args.media_base_url,
            metadata=metadata,
        )
    print(f"wrote {summary.rows:,} {summary.format} record(s) to {summary.path}")
    if summary.skipped:
        print(f"left out {summary.skipped:,}: {summary.skipped_why}")
    for note in summary.notes:
        print(f"note: {note}")
    return 0


def _gaps(args: argparse.Namespace) -> int:
    from fieldscope.collect.store import open_store
    from fieldscope.edge.errors import ConfigError

    if args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    with open_store(args.db, create=False) as store:
        gaps = store.gaps(tuple(args.device), limit=args.limit)
        missing = store.missing_counts(tuple(args.device))
    if not gaps:
        print("no gaps: every device's identifications arrived without a hole in seq")
        return 0
    for gap in gaps:
        span = str(gap.first) if gap.first == gap.last else f"{gap.first}..{gap.last}"
        print(f"{gap.station}/{gap.device}: seq {span} missing ({gap.missing})")
    for device, n in sorted(missing.items()):
        print(f"{device}: {n} identification(s) missing in total")
    return 1


def _serve(args: argparse.Namespace) -> int:
    from fieldscope.collect.web import Dashboard, DashboardSettings
    from fieldscope.edge.errors import ConfigError

    for option, folder in (("--archive", args.archive), ("--images", args.images)):
        if folder is not None and not folder.is_dir():
            raise ConfigError(f"{option} {folder} is not a folder")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be 0-65535, got {args.port}")
    if args.max_upload_mb <= 0:
        raise ConfigError("--max-upload-mb must be > 0")
    dashboard = Dashboard(
        DashboardSettings(
            db_url=args.db,
            host=args.host,
            port=args.port,
            bundles=tuple(args.bundle),
            public_key=args.public_key,
            archive=args.archive,
            images=args.images,
            max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
            stale_after_s=args.stale_after,
            auth_file=args.auth_file,
        )
    )
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        host, port = dashboard.start()
        print(f"dashboard on http://{host}:{port}/ ; Ctrl-C to stop", file=sys.stderr)
        while not stop.wait(1.0):
            pass
    finally:
        dashboard.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
