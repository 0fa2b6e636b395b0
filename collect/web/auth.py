"""Tokens for the dashboard's write endpoints (``--auth-file``).

The file holds one token, or lines of ``user:token`` (blank lines and ``#`` comments
are skipped). A request proves itself with ``Authorization: Bearer TOKEN`` (the API,
scripts) or HTTP Basic ``user:token`` (a browser's own login prompt on the upload
page; with a one-token file any user name goes). Tokens are compared with
:func:`hmac.compare_digest`, each one, so the time taken tells nothing about them.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import dataclass
from pathlib import Path

from fieldscope.edge.errors import ConfigError

__all__ = ["AuthResult", "TokenFile"]

# Shorter tokens are guessable over a network.
MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class AuthResult:
    """``ok``; else whether credentials came at all (401) or were wrong (403).
    ``user``: the token's user, or the HTTP Basic login name given with a bare token."""

    ok: bool
    presented: bool
    user: str | None = None


@dataclass(frozen=True)
class TokenFile:
    """The accepted (user or None, token) pairs of an ``--auth-file``."""

    entries: tuple[tuple[str | None, str], ...]

    @classmethod
    def load(cls, path: Path) -> TokenFile:
        """Read and check the file.

        Raises:
            ConfigError: unreadable, empty, or a token shorter than 16 characters,
                naming the file and line.
        """
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeError) as exc:
            raise ConfigError(f"--auth-file {path}: cannot read it: {exc}") from exc
        entries: list[tuple[str | None, str]] = []
        lines = [
            (n, line.strip())
            for n, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.strip().startswith("#")
        ]
        for n, line in lines:
            user, sep, token = line.rpartition(":")
            if not sep and len(lines) > 1:
                raise ConfigError(
                    f"{path}:{n}: expected user:token (one bare token only in a one-line file)"
                )
            if len(token) < MIN_TOKEN_CHARS:
                raise ConfigError(
                    f"{path}:{n}: the token has {len(token)} characters; use at least "
                    f"{MIN_TOKEN_CHARS} (e.g. python -c 'import secrets; "
                    "print(secrets.token_urlsafe())')"
                )
            entries.append((user or None, token))
        if not entries:
            raise ConfigError(f"--auth-file {path} holds no token")
        return cls(tuple(entries))

    def check(self, authorization: str | None) -> AuthResult:
        """Whether an ``Authorization`` header value carries an accepted token."""
        if not authorization:
            return AuthResult(ok=False, presented=False)
        scheme, _, credentials = authorization.strip().partition(" ")
        user: str | None = None
        if scheme.lower() == "bearer":
            token = credentials.strip()
        elif scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeError):
                return AuthResult(ok=False, presented=True)
            user, _, token = decoded.partition(":")
        else:
            return AuthResult(ok=False, presented=False)
        matched: str | None = None
        found = False
        for name, accepted in self.entries:
            same = hmac.compare_digest(token.encode(), accepted.encode())
            if same and (
                name is None or user is None or hmac.compare_digest(user.encode(), name.encode())
            ):
                found = True
                matched = name
        # A one-token file names nobody: a browser's login name stands for the person.
        return AuthResult(ok=found, presented=True, user=matched if matched else user or None)
