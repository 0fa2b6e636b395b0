"""Bundle files on disk: read with a size cap, written so that a reader sees the old
content or the new, never half of it.

Bundles, signatures and key pairs are replaced by writing a temporary sibling, fsyncing
it and renaming it into place; a power cut on a Pi leaves a working bundle either way.
Reads refuse special files and anything over a cap before reading it whole.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fieldscope.edge.errors import BundleError
from fieldscope.edge.untrusted import RejectedValueError, read_regular_file

__all__ = [
    "atomic_path",
    "create_beside",
    "fsync_dir",
    "read_capped",
    "swap_into_place",
    "write_file",
]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes, mode: int = 0o666) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def create_beside(target: Path, tag: str, *, directory: bool = False, mode: int = -1) -> Path:
    """Create a new, uniquely named file or folder next to ``target`` with ``mode`` less
    the umask (default 0666 / 0777, as any file the user makes). Not mkstemp/mkdtemp:
    their 0600/0700 would stay on a bundle or signature that a web server or another
    user must read (only private keys are meant to be 0600)."""
    import secrets

    if mode < 0:
        mode = 0o777 if directory else 0o666
    for _ in range(100):
        path = target.with_name(f".{target.name}.{tag}.{secrets.token_hex(4)}")
        try:
            if directory:
                path.mkdir(mode=mode)
            else:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free temporary name beside {target}")


@contextlib.contextmanager
def atomic_path(target: Path, mode: int = 0o666) -> Iterator[Path]:
    """A temporary path next to ``target`` that replaces it when the block succeeds; the
    file is created with ``mode`` less the umask."""
    tmp = create_beside(target, "tmp", mode=mode)
    try:
        yield tmp
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def swap_into_place(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing ``target`` is moved aside, then removed."""
    if not target.exists():
        new.rename(target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    old.rmdir()
    target.rename(old)
    try:
        new.rename(target)
    except OSError:
        old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def read_capped(bundle_dir: Path, name: str, max_bytes: int) -> bytes:
    """A bundle file's bytes, refusing special files and anything over ``max_bytes``
    before reading it whole (a 300 MB manifest, a model symlinked to /dev/zero)."""
    try:
        return read_regular_file(bundle_dir / name, max_bytes)
    except RejectedValueError as exc:
        raise BundleError(f"bundle {bundle_dir}: {name} {exc}") from None
    except OSError as exc:
        raise BundleError(
            f"bundle {bundle_dir}: cannot read {name}: {exc.strerror or exc}"
        ) from exc
