"""Secured mosquitto brokers for tests: TLS certificates, client certificates, passwords.

Certificates are made in the test with `cryptography` (an edge dependency): a CA, a
server certificate for 127.0.0.1 and a client certificate, all signed by the CA.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import Broker


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def broker_lines(self, *, require_certificate: bool = False) -> list[str]:
        """mosquitto.conf lines for a TLS listener (asking for a client certificate)."""
        lines = [f"cafile {self.ca}", f"certfile {self.server_cert}", f"keyfile {self.server_key}"]
        if require_certificate:
            lines += ["require_certificate true"]
        return lines


@contextlib.contextmanager
def mosquitto_dir() -> Iterator[Path]:
    """A directory where mosquitto can read its files and save its persistence file.

    Started as root, mosquitto drops to the ``mosquitto`` user, who cannot write
    inside pytest's root-only tmp_path: it would then silently lose its state on a
    restart. A directory it owns makes ``persistence true`` real.
    """
    path = Path(tempfile.mkdtemp(prefix="fieldscope-mosquitto-"))
    if os.geteuid() == 0:
        with contextlib.suppress(KeyError):
            user = pwd.getpwnam("mosquitto")
            os.chown(path, user.pw_uid, user.pw_gid)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def start_configured(workdir: Path, lines: list[str]) -> Broker:
    """A mosquitto with extra configuration lines (TLS, passwords, ACLs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "mosquitto.conf"
    log = workdir / "mosquitto.log"
    config.write_text("\n".join([f"listener {port} 127.0.0.1", "log_dest stderr", *lines]) + "\n")
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    with log.open("ab") as fh:
        proc = subprocess.Popen([binary, "-c", str(config)], stdout=fh, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return Broker("127.0.0.1", port, proc, config, log)
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"mosquitto did not start:\n{log.read_text()}")


def password_lines(directory: Path, user: str, password: str) -> list[str]:
    """mosquitto.conf lines that let only ``user`` in, with ``password``."""
    passwd = directory / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), user, password], check=True)
    passwd.chmod(0o644)
    return ["allow_anonymous false", f"password_file {passwd}"]


def _certificate(subject: str, key: Any, signer: Any, *, ca: bool, server: bool) -> Any:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fieldscope test CA")]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(signer, hashes.SHA256())


def make_certificates(directory: Path) -> Certificates:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = serialization.Encoding.PEM
    ca_key = ec.generate_private_key(ec.SECP256R1())
    made = {"ca.pem": _certificate("fieldscope test CA", ca_key, ca_key, ca=True, server=False)}
    for name, subject, server in (("server", "127.0.0.1", True), ("client", "collector", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        made[f"{name}.pem"] = _certificate(subject, key, ca_key, ca=False, server=server)
        (directory / f"{name}.key").write_bytes(
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
    for name, cert in made.items():
        (directory / name).write_bytes(cert.public_bytes(pem))
    paths = Certificates(
        *(directory / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key"))
    )
    for path in vars(paths).values():
        path.chmod(0o644)
    return paths
