"""``fieldscope deploy provision | rollout | rollback | status``: a thin wrapper over Ansible.

The playbooks under ``fieldscope/deploy/ansible/`` do the work, so an operator can
always run them with plain ``ansible-playbook`` (and their own Ansible settings,
vault, jump hosts). This wrapper only saves typing: it builds the wheel for
``provision``, checks a bundle locally before a ``rollout`` touches the fleet,
finds the installed playbooks and passes the right extra variables. Everything
after ``--`` goes to ``ansible-playbook`` unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from importlib.resources import files
from pathlib import Path
from typing import Any

__all__ = ["ansible_command", "build_wheel", "playbook_dir", "register"]

INSTALL_HINT = "pip install 'fieldscope[deploy]'"


def register(subparsers: Any) -> None:
    """Add ``fieldscope deploy`` and its actions to the ``fieldscope`` parser."""
    p = subparsers.add_parser(
        "deploy",
        help="provision devices and roll model bundles out with Ansible",
        description="Run the fieldscope Ansible playbooks (provision, rollout, rollback, "
        "status) against an inventory of stations and devices. Arguments after `--` go to "
        "ansible-playbook unchanged (e.g. -- --ask-become-pass -vv).",
    )
    actions = p.add_subparsers(dest="deploy_command", metavar="ACTION")
    actions.required = True

    s = actions.add_parser(
        "provision",
        help="install fieldscope[edge], its configuration and systemd unit on every device",
    )
    _common(s)
    s.add_argument(
        "--wheel",
        type=Path,
        help="a fieldscope wheel to install (default: build one from --source)",
    )
    s.add_argument(
        "--source",
        type=Path,
        default=Path(),
        help="the fieldscope source tree to build the wheel from (default: .)",
    )
    s.set_defaults(handler=_provision)

    _add_rollout(actions)

    s = actions.add_parser("rollback", help="put devices back on their previous bundle")
    _common(s)
    s.set_defaults(handler=_rollback)

    s = actions.add_parser("status", help="print which model every device runs")
    _common(s)
    s.set_defaults(handler=_status)


def _common(sub: argparse.ArgumentParser) -> None:
    """The options every deploy action takes: inventory, limit, extra vars, Ansible args."""
    sub.add_argument(
        "-i",
        "--inventory",
        required=True,
        type=Path,
        help="Ansible inventory (stations as groups)",
    )
    sub.add_argument("--limit", help="only these hosts or stations (Ansible host pattern)")
    sub.add_argument(
        "-e",
        "--extra-var",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra variable for the playbook (repeatable)",
    )
    sub.add_argument("ansible_args", nargs="*", metavar="-- ANSIBLE_ARGS")


def _add_rollout(actions: Any) -> None:
    """``fieldscope deploy rollout``: canary first, then batches."""
    s = actions.add_parser(
        "rollout",
        help="ship a bundle: canary first, then batches; unhealthy devices roll back",
    )
    _common(s)
    s.add_argument("--bundle", required=True, type=Path, help="the bundle directory to ship")
    s.add_argument(
        "--public-key",
        type=Path,
        help="check the bundle's signature here first (the devices check it against theirs)",
    )
    s.add_argument(
        "--keep",
        type=int,
        help="newest bundles kept on each device, always with current and previous (default 3)",
    )
    s.add_argument(
        "--serial",
        help="batch sizes, comma separated (default 1,25%%: one canary, then quarters)",
    )
    s.set_defaults(handler=_rollout)


def playbook_dir() -> Path:
    """The installed playbooks (``fieldscope/deploy/ansible``)."""
    return Path(str(files("fieldscope.deploy") / "ansible"))


def find_ansible_playbook() -> str | None:
    """``ansible-playbook`` of this Python's environment, else the one on PATH.

    ``pip install 'fieldscope[deploy]'`` into a venv puts it beside this interpreter;
    ``.venv/bin/fieldscope deploy`` runs without the venv activated, so PATH alone
    would miss it.
    """
    beside = Path(sys.executable).parent / "ansible-playbook"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("ansible-playbook")


def ansible_command(
    playbook: str,
    inventory: Path,
    extra_vars: dict[str, Any],
    *,
    limit: str | None = None,
    passthrough: list[str] | None = None,
) -> list[str]:
    """The ``ansible-playbook`` command line for one of our playbooks.

    Raises:
        FieldscopeError: ``ansible-playbook`` is not installed, or the inventory is missing.
    """
    from fieldscope.edge.errors import FieldscopeError, MissingDependencyError

    binary = find_ansible_playbook()
    if binary is None:
        raise MissingDependencyError(
            f"ansible-playbook is neither beside {sys.executable} nor on PATH; install "
            f"Ansible with: {INSTALL_HINT}"
        )
    if not inventory.exists():
        raise FieldscopeError(
            f"inventory {inventory} does not exist; start from "
            f"{playbook_dir() / 'inventory.example.yml'}"
        )
    command = [binary, "-i", str(inventory), str(playbook_dir() / playbook)]
    if extra_vars:
        command += ["-e", json.dumps(extra_vars)]
    if limit:
        command += ["--limit", limit]
    return command + list(passthrough or [])


def build_wheel(source: Path, out_dir: Path) -> Path:
    """Build the fieldscope wheel from a source tree (``python -m build``, else pip).

    Raises:
        FieldscopeError: ``source`` is not a fieldscope source tree or the build failed.
    """
    from fieldscope.edge.errors import FieldscopeError

    if not (source / "pyproject.toml").is_file():
        raise FieldscopeError(
            f"{source.resolve()} has no pyproject.toml: run from the fieldscope source tree, "
            "pass --source DIR, or pass a built wheel with --wheel"
        )
    try:
        import build  # noqa: F401

        command = [sys.executable, "-m", "build", "--wheel", "--outdir", str(out_dir), str(source)]
    except ImportError:
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out_dir)]
        command.append(str(source))
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(out_dir.glob("fieldscope-*.whl"))
    if done.returncode != 0 or not wheels:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FieldscopeError(f"building the wheel from {source} failed: {tail[0]}")
    return wheels[-1]


def _extra(args: argparse.Namespace) -> dict[str, Any]:
    from fieldscope.edge.errors import FieldscopeError

    out: dict[str, Any] = {}
    for item in args.extra_var:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FieldscopeError(f"--extra-var {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _run(playbook: str, args: argparse.Namespace, extra: dict[str, Any]) -> int:
    command = ansible_command(
        playbook,
        args.inventory,
        {**extra, **_extra(args)},
        limit=args.limit,
        passthrough=args.ansible_args,
    )
    env = dict(os.environ)
    env.setdefault("ANSIBLE_CONFIG", str(playbook_dir() / "ansible.cfg"))
    return subprocess.run(command, env=env, check=False).returncode


def _provision(args: argparse.Namespace) -> int:
    from fieldscope.edge.errors import FieldscopeError

    ansible_command("provision.yml", args.inventory, {})  # fail before a slow build
    if args.wheel is not None:
        if not args.wheel.is_file():
            raise FieldscopeError(f"--wheel {args.wheel}: no such file")
        return _run("provision.yml", args, {"fieldscope_wheel": str(args.wheel.resolve())})
    with tempfile.TemporaryDirectory(prefix="fieldscope-wheel-") as tmp:
        print(f"building the wheel from {args.source.resolve()} ...", file=sys.stderr)
        wheel = build_wheel(args.source, Path(tmp))
        return _run("provision.yml", args, {"fieldscope_wheel": str(wheel)})


def _rollout(args: argparse.Namespace) -> int:
    from fieldscope.edge.bundle import verify_bundle
    from fieldscope.edge.errors import FieldscopeError

    ansible_command("rollout.yml", args.inventory, {})
    # Check here first: a bundle that fails on the workstation needs no canary.
    bundle = verify_bundle(args.bundle, public_key=args.public_key, load_model=False)
    m = bundle.manifest
    print(f"rolling out {m.model_name} {m.model_version} ({bundle.sha256[:12]})", file=sys.stderr)
    extra: dict[str, Any] = {"fieldscope_bundle": str(args.bundle.resolve())}
    if args.keep is not None:
        if args.keep < 1:
            raise FieldscopeError(f"--keep {args.keep}: must be at least 1")
        extra["fieldscope_keep_bundles"] = args.keep
    if args.serial:
        extra["fieldscope_serial"] = [
            int(part) if part.strip().isdigit() else part.strip() for part in args.serial.split(",")
        ]
    return _run("rollout.yml", args, extra)


def _rollback(args: argparse.Namespace) -> int:
    return _run("rollback.yml", args, {})


def _status(args: argparse.Namespace) -> int:
    return _run("status.yml", args, {})
