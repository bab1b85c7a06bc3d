"""Who a request acts as: bearer tokens, their tenants and the admin scope.

A tokens file (TOML) lists ``[[token]]`` tables, each with ``sha256`` (hex
digest of the bearer token; the token itself is never stored), ``tenant`` and
``admin``. A tenant token acts only as its tenant: the API takes its tenant for
every submission and hides every other tenant's runs (404, so ids do not leak).
An admin token sees every tenant and alone reaches the cluster, membership and
metrics routes. The single ``api_token`` of older configurations is one admin
token. With neither configured the API is open (a loopback-only peer: see
``Settings.check_auth``) and every caller is an admin.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass

DEFAULT_TENANT = "default"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class TokensFileError(ValueError):
    """The tokens file cannot be read or does not describe tokens."""


@dataclass(frozen=True)
class Principal:
    """The caller. ``tenant`` is None for an admin, who may act as any tenant;
    ``key`` names the token (its digest) for per-token limits."""

    admin: bool
    tenant: str | None
    key: str

    def submission_tenant(self, requested: str | None) -> str | None:
        """The tenant a submission runs as, or None when ``requested`` is not
        this caller's to use (the API answers 403)."""
        if self.tenant is None:
            return requested
        if requested not in (None, self.tenant):
            return None
        return self.tenant

    def sees(self, tenant: str) -> bool:
        return self.tenant is None or self.tenant == tenant


OPEN = Principal(admin=True, tenant=None, key="open")


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Authenticator:
    """Maps a presented bearer token to its principal (None: not a known token)."""

    def __init__(self, principals: dict[str, Principal]) -> None:
        self._by_digest = principals

    @classmethod
    def build(cls, api_token: str = "", tokens_file: str = "") -> Authenticator:
        principals = load_tokens(tokens_file) if tokens_file else {}
        if api_token:
            digest = token_digest(api_token)
            principals[digest] = Principal(admin=True, tenant=None, key=digest)
        return cls(principals)

    @property
    def open(self) -> bool:
        return not self._by_digest

    def principal(self, token: str | None) -> Principal | None:
        if self.open:
            return OPEN
        if not token:
            return None
        # A dict lookup by the digest: what timing could reveal is about the
        # digest of a guess, not about a stored token.
        return self._by_digest.get(token_digest(token))


def load_tokens(path: str) -> dict[str, Principal]:
    """The tokens a file lists, by digest; TokensFileError says what is wrong."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TokensFileError(f"cannot read the API tokens file {path}: {exc}") from exc
    unknown = set(data) - {"token"}
    entries = data.get("token")
    if unknown or not isinstance(entries, list) or not entries:
        raise TokensFileError(
            f"{path} must hold one or more [[token]] tables (sha256, tenant, admin) and nothing else"
        )
    principals: dict[str, Principal] = {}
    for n, entry in enumerate(entries, 1):
        where = f"{path}: token {n}"
        extra = set(entry) - {"sha256", "tenant", "admin"}
        if extra:
            raise TokensFileError(f"{where} has unknown keys {sorted(extra)}")
        digest = str(entry.get("sha256", "")).lower()
        if not _HEX64.match(digest):
            raise TokensFileError(
                f"{where}: sha256 must be the 64 hex digits of the token's SHA-256 "
                "(e.g. printf %s TOKEN | sha256sum)"
            )
        admin = entry.get("admin", False)
        tenant = entry.get("tenant")
        if not isinstance(admin, bool):
            raise TokensFileError(f"{where}: admin must be true or false")
        if not admin and not (isinstance(tenant, str) and 0 < len(tenant) <= 256):
            raise TokensFileError(f"{where}: a tenant token needs tenant = a name of 1..256 chars")
        if digest in principals:
            raise TokensFileError(f"{where}: this sha256 is listed twice")
        principals[digest] = Principal(admin=admin, tenant=None if admin else tenant, key=digest)
    return principals
