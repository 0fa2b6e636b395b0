"""Signing keys for bundles: make a pair, and check a private key before a long conversion.

Signing itself is :func:`fieldscope.edge.bundle.sign_bundle`; this module only makes
sure that a bad ``--sign-key`` is reported in the first second, not after minutes of
quantisation and fidelity checking.
"""

from __future__ import annotations

from pathlib import Path

from fieldscope.edge.bundle import generate_keypair
from fieldscope.edge.errors import BundleError, create_folder
from fieldscope.edge.signing import load_private_key

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
    create_folder(private.parent, "the folder for the keys", BundleError)
    generate_keypair(private, public, overwrite=overwrite)
    return private, public


def check_private_key(path: Path) -> None:
    """Fail now if ``path`` cannot sign a bundle: an unencrypted ed25519 private key
    in PEM form (what :func:`fieldscope.edge.signing.load_private_key` reads).

    Raises:
        BundleError: naming what is wrong with the file.
    """
    load_private_key(path)
