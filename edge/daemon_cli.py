"""Command line of the edge daemon: ``fieldscope edge run | check-config | status``.

:func:`add_daemon_commands` adds the three actions to the ``fieldscope edge``
sub-parser (``fieldscope.edge.cli`` calls it). The same actions run without the
``fieldscope`` entry point as ``python -m fieldscope.edge.daemon --config FILE``
(what the systemd unit may use) through :func:`main`.

Handlers turn expected failures into ``FieldscopeError``: the dispatcher prints one
line and exits 2. ``status`` exits 0 when the daemon runs and 3 when it does not
(the LSB convention ``systemctl status`` follows), so a deployment playbook can test
it without parsing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["EXIT_NOT_RUNNING", "add_daemon_commands", "main", "station_status"]

# `status` exit code when no daemon runs (LSB: "program is not running").
EXIT_NOT_RUNNING = 3


def add_daemon_commands(edge_subparsers: Any) -> None:
    """Add ``run``, ``check-config`` and ``status`` to the ``fieldscope edge`` actions."""
    r = edge_subparsers.add_parser(
        "run",
        help="run the station daemon (capture, classify, publish over MQTT)",
        description="Run the edge daemon in the foreground until SIGTERM or SIGINT: capture "
        "frames, gate, denoise and classify them, store every identification in the durable "
        "outbox and publish it over MQTT. SIGHUP reloads the bundle. Logs go to stderr, one "
        "line per event (journald keeps them under systemd).",
    )
    r.add_argument("--config", required=True, type=Path, metavar="FILE", help="edge.toml")
    r.set_defaults(handler=_run)
    c = edge_subparsers.add_parser(
        "check-config",
        help="validate a daemon configuration and print the effective settings",
        description="Read and validate FILE as the daemon would, print the effective "
        "configuration (defaults filled in, secrets masked) and warn about what is not "
        "ready on this machine yet. Every problem is reported at once with its line.",
    )
    c.add_argument("config", type=Path, metavar="FILE")
    c.set_defaults(handler=_check_config)
    s = edge_subparsers.add_parser(
        "status",
        help="show whether the daemon runs, its model and its outbox depth",
        description="Read the station's local state: whether the daemon runs, the model it "
        "serves (or the configured bundle when it is stopped) and how many messages wait in "
        "its outbox. Exit status 0: running; 3: not running.",
    )
    s.add_argument("--config", required=True, type=Path, metavar="FILE", help="edge.toml")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(handler=_status)


def _run(args: argparse.Namespace) -> int:
    from fieldscope.edge.config import load_config
    from fieldscope.edge.daemon import Daemon, configure_logging

    cfg = load_config(args.config)
    verbose = int(getattr(args, "verbose", 0) or 0)
    configure_logging("DEBUG" if verbose > 1 else cfg.log.level)
    return Daemon(cfg).run()


def _check_config(args: argparse.Namespace) -> int:
    from fieldscope.edge.config import check_config

    print(check_config(args.config), end="")
    return 0


def _pid_alive(pid: object) -> bool:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user (the service user)
    return True


def station_status(config: Path) -> dict[str, Any]:
    """What ``fieldscope edge status`` reports, as a dict.

    While the daemon runs it holds the outbox exclusively, so the outbox figures come
    from the state file it rewrites at every heartbeat (``as_of`` says when); while it
    is stopped they are read from the outbox itself, and the model is the configured
    bundle.

    Raises:
        FieldscopeError: the configuration is invalid, or the outbox or state file
            cannot be read.
    """
    from fieldscope.edge.config import load_config
    from fieldscope.edge.daemon import read_state_file
    from fieldscope.edge.outbox import OutboxBusyError, peek_stats

    cfg = load_config(config)
    state = read_state_file(cfg.device.data_dir) or {}
    report: dict[str, Any] = {"station": cfg.device.station, "device": cfg.device.id}
    try:
        stats = peek_stats(
            cfg.outbox.path, max_messages=cfg.outbox.max_messages, when_full=cfg.outbox.when_full
        )
    except OutboxBusyError:
        stats = None
        running = True
    else:
        running = False
    report["running"] = running and _pid_alive(state.get("pid"))
    if running:
        report["pid"] = state.get("pid")
        report["model"] = state.get("model")
        report["outbox"] = state.get("outbox")
        report["as_of"] = state.get("updated_at")
        report["camera"] = state.get("camera")
        report["paused"] = state.get("paused")
        if not report["running"]:
            report["note"] = "the outbox is locked by a process that left no state file"
        report["running"] = True
        return report
    report["outbox"] = (
        {"depth": 0, "dropped": 0, "next_seq": None}
        if stats is None
        else {"depth": stats.depth, "dropped": stats.dropped, "next_seq": stats.next_seq}
    )
    report.update(_configured_model(cfg.model.bundle))
    return report


def _configured_model(bundle_path: Path) -> dict[str, Any]:
    """The model the configured bundle holds (the daemon is stopped), or its problem."""
    from fieldscope.edge.bundle import read_bundle
    from fieldscope.edge.errors import BundleError

    try:
        bundle = read_bundle(Path(os.path.realpath(bundle_path)))
    except BundleError as exc:
        return {"model": None, "model_problem": str(exc)}
    m = bundle.manifest
    return {"model": {"name": m.model_name, "version": m.model_version, "sha256": bundle.sha256}}


def _status(args: argparse.Namespace) -> int:
    report = station_status(args.config)
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        where = f"{report['station']}/{report['device']}"
        if report["running"]:
            print(f"{where}: running (pid {report.get('pid')}, as of {report.get('as_of')})")
        else:
            print(f"{where}: not running")
        model = report.get("model")
        label = "serving" if report["running"] else "configured"
        if model:
            print(f"model ({label}): {model['name']} {model['version']} (sha256 {model['sha256']})")
        else:
            print(f"model ({label}): none ({report.get('model_problem', 'unknown')})")
        outbox = report.get("outbox") or {}
        print(
            f"outbox: {outbox.get('depth', '?')} waiting, {outbox.get('dropped', '?')} dropped, "
            f"next seq {outbox.get('next_seq', '?')}"
        )
    return 0 if report["running"] else EXIT_NOT_RUNNING


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fieldscope.edge.daemon``: the daemon's actions without the
    ``fieldscope`` entry point (``run`` is implied when the first argument is an
    option). Expected failures print one line and return 2."""
    import logging

    from fieldscope.edge.errors import FieldscopeError

    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or (args_list[0].startswith("-") and args_list[0] not in ("-h", "--help")):
        args_list.insert(0, "run")
    parser = argparse.ArgumentParser(
        prog="python -m fieldscope.edge.daemon", description="The fieldscope edge daemon."
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    add_daemon_commands(actions)
    args = parser.parse_args(args_list)
    logging.basicConfig(level=logging.WARNING)
    try:
        return int(args.handler(args) or 0)
    except FieldscopeError as exc:
        print(f"fieldscope edge {args.action}: error: {exc}", file=sys.stderr)
        return 2
