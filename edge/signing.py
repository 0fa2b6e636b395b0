"""Bundle signatures: ed25519 key pairs, and checking ``manifest.sig`` against a key.

The signature is a raw 64-byte ed25519 signature over the exact bytes of
``manifest.json``, so ``openssl pkeyutl -verify -rawin`` can check it too; the manifest
holds every other file's checksum, so it covers the whole bundle.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fieldscope.edge.bundle_files import atomic_path, read_capped, write_file
from fieldscope.edge.errors import BundleError
from fieldscope.edge.manifest import MANIFEST_FILE, SIGNATURE_FILE
from fieldscope.edge.untrusted import RejectedValueError, read_regular_file

__all__ = ["check_signature", "generate_keypair", "load_private_key", "load_public_key"]

logger = logging.getLogger(__name__)
MAX_KEY_BYTES = 64 * 1024


def load_public_key(path: Path) -> Any:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        data = read_regular_file(path, MAX_KEY_BYTES)
    except RejectedValueError as exc:
        raise BundleError(f"public key {path} {exc}") from None
    except OSError as exc:
        raise BundleError(f"cannot read public key {path}: {exc.strerror or exc}") from exc
    if b"PRIVATE KEY" in data:
        raise BundleError(
            f"{path} is a private key; give the public key (keep the private key off devices)"
        )
    try:
        key = load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise BundleError(
            f"{path} is not a PEM public key (the ed25519 public key that "
            "generate_keypair wrote, or `openssl pkey -pubout` of the private key)"
        ) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"{path} is a {type(key).__name__}, not an ed25519 public key")
    return key


def load_private_key(path: Path) -> Any:
    """The ed25519 private key that signs bundles, from an unencrypted PEM file.

    Raises:
        BundleError: naming what is wrong with the file (unreadable, a public key,
            encrypted, not PEM, another algorithm) and what to give instead.
    """
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        data = Path(path).read_bytes()
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
    return key


def check_signature(bundle_dir: Path, manifest_bytes: bytes, public_key: Path) -> None:
    from cryptography.exceptions import InvalidSignature

    key = load_public_key(public_key)
    sig_path = bundle_dir / SIGNATURE_FILE
    if not sig_path.is_file():
        raise BundleError(
            f"bundle {bundle_dir} is not signed (no {SIGNATURE_FILE}) but a public key was "
            "given, so a signature is required"
        )
    try:
        key.verify(read_capped(bundle_dir, SIGNATURE_FILE, MAX_KEY_BYTES), manifest_bytes)
    except InvalidSignature as exc:
        raise BundleError(
            f"bundle {bundle_dir}: {SIGNATURE_FILE} is not a valid signature of "
            f"{MANIFEST_FILE} for public key {public_key} (the manifest was changed after "
            "signing, or it was signed with another key)"
        ) from exc


def generate_keypair(private_path: Path, public_path: Path, *, overwrite: bool = False) -> None:
    """Create an ed25519 key pair as PEM files; the private key is readable by its owner only.

    Raises:
        BundleError: a key file exists (and not ``overwrite``) or cannot be written.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_path, public_path = Path(private_path), Path(public_path)
    for p in (private_path, public_path):
        if p.exists() and not overwrite:
            raise BundleError(f"refusing to overwrite existing key file {p}")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        # Created 0600 from the start (not chmod-ed afterwards), so it is never readable.
        # The public key is meant to be shared: the umask decides (0644 with umask 022).
        with atomic_path(private_path, mode=0o600) as tmp:
            write_file(tmp, private_pem, 0o600)
        with atomic_path(public_path) as tmp:
            write_file(tmp, public_pem)
    except OSError as exc:
        raise BundleError(f"cannot write key pair: {exc}") from exc
    logger.info("wrote ed25519 key pair %s, %s", private_path, public_path)
