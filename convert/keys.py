"""Signing keys for bundles: make a pair, and check a private key before a long conversion.

Signing itself is :func:`fieldscope.edge.bundle.sign_bundle`; this module only makes
sure that a bad ``--sign-key`` is reported in the first second, not after minutes of
quantisation and fidelity checking.
"""

from __future__ import annotations

from pathlib import Path

from fieldscope.edge.bundle import generate_keypair
from fieldscope.edge.errors import BundleError

__all__ = ["check_private_key", "key_paths", "new_keypair"]

PRIVATE_SUFFIX = ".key"
PUBLIC_SUFFIX = ".pub"


def key_paths(prefix: Path) -> tuple[Path, Path]:
    """``PREFIX.key`` (private) and ``PREFIX.pub`` (public) for an output prefix."""
    prefix = Path(prefix)
    return (
        prefix.with_name(prefix.name + PRIVATE_SUFFIX),
        prefix.with_name(prefix.name + PUBLIC_SUFFIX),
    )


def new_keypair(prefix: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write an ed25519 pair as ``PREFIX.key`` (mode 0600) and ``PREFIX.pub``.

    The folder is created when missing, as ``train --out`` and ``convert --out`` do.

    Raises:
        BundleError: a key file exists (and not ``overwrite``), or the folder cannot be
            created or written.
    """
    private, public = key_paths(prefix)
    try:
        private.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BundleError(
            f"cannot write keys: cannot create the folder {private.parent}: {exc.strerror or exc}"
        ) from exc
    generate_keypair(private, public, overwrite=overwrite)
    return private, public


def check_private_key(path: Path) -> None:
    """Fail now if ``path`` is not an unencrypted ed25519 private key in PEM form.

    Raises:
        BundleError: naming what is wrong with the file.
    """
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read signing key {path}: {exc.strerror or exc}") from exc
    if b"PUBLIC KEY" in data and b"PRIVATE KEY" not in data:
        raise BundleError(
            f"{path} is a public key; sign with the private key (fieldscope keys new "
            "writes PREFIX.key and PREFIX.pub)"
        )
    try:
        key = load_pem_private_key(data, password=None)
    except TypeError as exc:
        raise BundleError(f"signing key {path} is encrypted; give an unencrypted key") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise BundleError(f"{path} is not a PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"{path} is a {type(key).__name__}, not an ed25519 private key")
