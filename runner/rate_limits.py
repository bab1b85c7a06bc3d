"""Named limits of model providers, and this peer's share of them.

A provider limits requests and tokens per minute, per key, across every peer
that uses the key. ``MESH_RATE_LIMITS="openai=500rpm:200000tpm,local=20concurrent"``
names such limits; a model endpoint names the one its calls count against
(``rate_limit``), and an agent takes capacity with ``ctx.limit(name, tokens=n)``.

No peer owns a limit. The leader hands each peer a *lease*: a share of every
bucket (capacity and refill rate) and of every concurrency count, valid for a
TTL and renewed with the peer's heartbeat (mesh/rate_limits.py decides the
shares). ``Limiter`` spends its leases here, in the peer, without asking
anyone per call. A peer without a live lease admits nothing: it waits.

Why the mesh stays under "R per minute" in *any* 60-second window: each
peer's share is a token bucket of capacity ``c`` refilled at ``r`` per second,
which admits at most ``c + 60 r`` in a minute; the leader never has more than
R of that leased out at once; a fresh lease starts empty, and an expired one
loses what it held. How the leader splits R into burst and refill is its own
business (mesh/rate_limits.py): the steady rate is the burst below R.
A request for more tokens than the peer's capacity waits for a full bucket and
leaves it in debt: only such a request can take a window past a tpm limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections import deque
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(rpm|tpm|concurrent)\s*")
_TABLE_KEYS = ("rpm", "tpm", "concurrent")


class RateLimitConfigError(ValueError):
    """A limit's spec cannot describe a usable limit."""


@dataclass(frozen=True)
class RateLimit:
    """Requests per minute, tokens per minute, calls at once: any of the three."""

    rpm: float | None = None
    tpm: float | None = None
    concurrent: int | None = None

    def __post_init__(self) -> None:
        if self.rpm is None and self.tpm is None and self.concurrent is None:
            raise RateLimitConfigError("a limit needs rpm, tpm or concurrent")
        for what, value in (("rpm", self.rpm), ("tpm", self.tpm)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise RateLimitConfigError(f"{what} must be a positive number, got {value!r}")
        if self.rpm is not None and self.rpm < 2:
            # The leader shares at most half a rate as burst and a request is
            # one whole unit: below 2 a minute nothing would be left to refill.
            raise RateLimitConfigError(f"rpm must be at least 2, got {self.rpm:g}")
        if self.concurrent is not None and (
            isinstance(self.concurrent, bool)
            or not isinstance(self.concurrent, int)
            or self.concurrent < 1
        ):
            raise RateLimitConfigError(
                f"concurrent must be a whole number >= 1, got {self.concurrent!r}"
            )


def parse_rate_limits(raw: Any) -> dict[str, RateLimit]:
    """``"openai=500rpm:200000tpm,local=20concurrent"`` (MESH_RATE_LIMITS), or
    the TOML table ``[rate_limits]`` whose values are such specs
    (``openai = "500rpm:200000tpm"``) or tables (``openai = {rpm = 500}``)."""
    if isinstance(raw, str):
        entries: dict[str, Any] = {}
        for item in raw.split(","):
            if not item.strip():
                continue
            name, sep, spec = item.partition("=")
            if not sep:
                raise RateLimitConfigError(
                    f"rate limit {item.strip()!r} is not NAME=SPEC "
                    '(e.g. "openai=500rpm:200000tpm,local=20concurrent")'
                )
            if name.strip() in entries:
                raise RateLimitConfigError(f"rate limit {name.strip()!r} is defined twice")
            entries[name.strip()] = spec
        raw = entries
    if not isinstance(raw, Mapping):
        raise RateLimitConfigError("rate_limits must map names to specs like 500rpm:20concurrent")
    limits: dict[str, RateLimit] = {}
    for name, value in raw.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise RateLimitConfigError(
                f"rate limit name {name!r}: use letters, digits, '_', '.', '-'"
            )
        try:
            limits[name] = _parse_one(value)
        except RateLimitConfigError as exc:
            raise RateLimitConfigError(f"rate limit {name}: {exc}") from None
    return limits


def _parse_one(value: Any) -> RateLimit:
    if isinstance(value, RateLimit):
        return value
    if isinstance(value, Mapping):
        unknown = set(value) - set(_TABLE_KEYS)
        if unknown:
            raise RateLimitConfigError(f"unknown keys {sorted(unknown)}; known: {_TABLE_KEYS}")
        table = dict(value)
    elif isinstance(value, str):
        table = {}
        for part in value.split(":"):
            found = _PART.fullmatch(part)
            if found is None:
                raise RateLimitConfigError(
                    f"{part.strip()!r} is not NUMBERrpm, NUMBERtpm or NUMBERconcurrent"
                )
            number, unit = found.groups()
            if unit in table:
                raise RateLimitConfigError(f"{unit} is given twice")
            table[unit] = number
    else:
        raise RateLimitConfigError(f"expected a spec like 500rpm:200000tpm, got {value!r}")
    try:
        return RateLimit(
            rpm=float(table["rpm"]) if "rpm" in table else None,
            tpm=float(table["tpm"]) if "tpm" in table else None,
            concurrent=_whole(table["concurrent"]) if "concurrent" in table else None,
        )
    except (TypeError, ValueError) as exc:
        if isinstance(exc, RateLimitConfigError):
            raise
        raise RateLimitConfigError(str(exc)) from None


def _whole(value: Any) -> int:
    number = float(value)
    if not number.is_integer():
        raise RateLimitConfigError(f"concurrent must be a whole number, got {value!r}")
    return int(number)


# -- this peer's leases ----------------------------------------------------------


@dataclass
class _Bucket:
    """One rate, leased: what this peer may still spend, refilled while the
    lease lives. ``tokens`` goes below zero only for a request larger than the
    peer's whole capacity, which is admitted when the bucket is full."""

    capacity: float = 0.0
    per_s: float = 0.0
    tokens: float = 0.0
    at: float = 0.0

    def refill(self, now: float, expires: float) -> None:
        until = min(now, expires)
        if until > self.at:
            self.tokens = min(self.capacity, self.tokens + (until - self.at) * self.per_s)
        self.at = max(self.at, until)
        if now >= expires:
            self.tokens = min(self.tokens, 0.0)  # the share is the leader's again

    def wait_s(self, amount: float) -> float:
        """How long until ``amount`` can be taken at the current refill."""
        need = min(amount, self.capacity) - self.tokens
        if need <= 0 and self.capacity > 0:
            return 0.0
        return need / self.per_s if self.per_s > 0 else math.inf


@dataclass
class _Lease:
    """This peer's share of one limit, as the leader last granted it."""

    limit: RateLimit
    expires: float = 0.0
    requests: _Bucket = field(default_factory=_Bucket)
    tokens: _Bucket = field(default_factory=_Bucket)
    concurrent: int = 0
    ttl_s: float = 0.0
    in_use: int = 0
    last_taken: float = -math.inf
    queue: deque[object] = field(default_factory=deque)
    changed: asyncio.Event | None = None

    def wait_s(self, now: float, tokens: int) -> float:
        """0 when a call may start now, else how long before it might."""
        if now >= self.expires:
            return math.inf
        self.requests.refill(now, self.expires)
        self.tokens.refill(now, self.expires)
        waits = [0.0]
        if self.limit.concurrent is not None and self.in_use >= self.concurrent:
            waits.append(math.inf)  # a finishing call wakes the queue
        if self.limit.rpm is not None:
            waits.append(self.requests.wait_s(1))
        if self.limit.tpm is not None and tokens > 0:
            waits.append(self.tokens.wait_s(tokens))
        return max(waits)

    def take(self, now: float, tokens: int) -> None:
        if self.limit.rpm is not None:
            self.requests.tokens -= 1
        if self.limit.tpm is not None:
            self.tokens.tokens -= tokens
        self.in_use += 1
        self.last_taken = now


class Limiter:
    """This peer's side of the mesh-wide limits: leases in, waiting calls out.

    ``renew`` takes what the leader granted in answer to a heartbeat sent at
    ``sent_at``: the lease is counted from then, before the leader granted it,
    so it always ends here before it ends on the leader's books.
    """

    def __init__(
        self,
        limits: Mapping[str, RateLimit],
        clock: Callable[[], float] = time.monotonic,
        on_wait: Callable[[str, float], None] | None = None,
    ) -> None:
        self._leases = {name: _Lease(limit) for name, limit in limits.items()}
        self._clock = clock
        self._on_wait = on_wait

    @property
    def names(self) -> list[str]:
        return sorted(self._leases)

    @property
    def limits(self) -> dict[str, RateLimit]:
        return {name: lease.limit for name, lease in self._leases.items()}

    def limit(self, name: str, tokens: int = 0) -> Permit:
        """Capacity of limit ``name`` (one of ``names``) for one call of about
        ``tokens`` tokens (see ``RunContext.limit``)."""
        if tokens < 0:
            raise ValueError("tokens must be >= 0")
        return Permit(self, name, tokens)

    def demand(self, now: float | None = None) -> dict[str, dict[str, int]]:
        """For the heartbeat: the limits this peer wants a share of (a call
        waits, runs, or started within the last lease) and the calls it runs."""
        now = self._clock() if now is None else now
        out = {}
        for name, lease in self._leases.items():
            if lease.queue or lease.in_use or now - lease.last_taken <= lease.ttl_s:
                out[name] = {"waiting": len(lease.queue), "in_use": lease.in_use}
        return out

    def renew(self, grants: Mapping[str, Mapping[str, Any]], sent_at: float, ttl_s: float) -> None:
        """Apply the leader's grants; a limit the leader left out keeps only
        what is left of its current lease."""
        now = self._clock()
        for name, grant in grants.items():
            lease = self._leases.get(name)
            if lease is None:
                continue  # the leader knows a limit this peer does not: nothing calls it
            for bucket, key in ((lease.requests, "requests"), (lease.tokens, "tokens")):
                bucket.refill(now, lease.expires)
                capacity, per_s = grant.get(key) or (0.0, 0.0)
                if now >= lease.expires:
                    bucket.at = now  # a fresh lease starts empty and refills from now
                bucket.capacity, bucket.per_s = float(capacity), float(per_s)
                bucket.tokens = min(bucket.tokens, bucket.capacity)
            lease.concurrent = int(grant.get("concurrent", 0))
            lease.expires = sent_at + ttl_s
            lease.ttl_s = ttl_s
            self._wake(lease)

    def try_take(self, name: str, tokens: int) -> float:
        """Take capacity for one call now (0), or say how long until the
        refill might allow it (inf: only a new lease or a finished call can);
        ahead of any call queued in ``acquire``."""
        lease = self._leases[name]
        now = self._clock()
        wait = lease.wait_s(now, tokens)
        if wait == 0:
            lease.take(now, tokens)
        return wait

    async def acquire(self, name: str, tokens: int) -> None:
        lease = self._leases[name]
        ticket = object()
        lease.queue.append(ticket)
        started = self._clock()
        try:
            while True:
                changed = self._changed(lease)
                wait = self.try_take(name, tokens) if lease.queue[0] is ticket else math.inf
                if wait == 0:
                    break
                # A new lease, a finished call or the head of the queue moving
                # wakes every waiter; the refill is waited for by time.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(None if math.isinf(wait) else wait):
                        await changed.wait()
        finally:
            lease.queue.remove(ticket)
            self._wake(lease)
        if self._on_wait is not None:
            self._on_wait(name, self._clock() - started)

    def release(self, name: str) -> None:
        lease = self._leases[name]
        lease.in_use -= 1
        self._wake(lease)

    @staticmethod
    def _changed(lease: _Lease) -> asyncio.Event:
        if lease.changed is None:
            lease.changed = asyncio.Event()
        return lease.changed

    @staticmethod
    def _wake(lease: _Lease) -> None:
        if lease.changed is not None:
            lease.changed.set()
            lease.changed = None


class Permit:
    """``async with ctx.limit(name, tokens=n):`` waits for the capacity and
    holds a concurrency slot until the block ends. ``await ctx.limit(...)``
    does the same for a limit without a concurrency count, where there is
    nothing to hold (it is refused for one with a count: the slot would never
    be given back)."""

    def __init__(self, limiter: Limiter, name: str, tokens: int) -> None:
        self._limiter = limiter
        self.name = name
        self.tokens = tokens

    async def __aenter__(self) -> Permit:
        await self._limiter.acquire(self.name, self.tokens)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def release(self) -> None:
        """Give back the concurrent call this permit holds (``__aexit__``)."""
        self._limiter.release(self.name)

    def __await__(self) -> Generator[Any, None, None]:
        return self._take().__await__()

    async def _take(self) -> None:
        if self._limiter.limits[self.name].concurrent is not None:
            raise TypeError(
                f"rate limit {self.name!r} counts concurrent calls: use "
                f'"async with ctx.limit({self.name!r}):" around the call'
            )
        await self._limiter.acquire(self.name, self.tokens)
        self._limiter.release(self.name)
