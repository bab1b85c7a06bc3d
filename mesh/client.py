"""Async client of the HTTP contract v1, shared by the CLI, the demo and tests.

Every peer serves the same API, so a client is bound to one peer's base URL
and callers pick which peer to talk to. Error bodies are turned into one
exception type carrying the server's code, so callers branch on codes rather
than on message text.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp

from raftmesh.consensus.status import TERMINAL_STATUSES
from raftmesh.mesh.tls import client_context


@dataclass(frozen=True)
class SSEMessage:
    """One Server-Sent Event: ``id`` is the run's event sequence (None for ``end``)."""

    event: str
    data: Any
    id: int | None = None


class MeshHTTPError(Exception):
    """A peer answered with a non-2xx status."""

    def __init__(
        self, status: int, code: str, message: str, retry_after: float | None = None
    ) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class MeshClient:
    """One peer's API. Use as ``async with MeshClient(url) as client: ...``."""

    def __init__(
        self, base_url: str, token: str | None = None, timeout_s: float = 10, ca: str | None = None
    ) -> None:
        """``ca``: the PEM file an https peer's certificate is checked against
        (the system's roots without it)."""
        self.base_url = base_url.rstrip("/")
        self._ca = ca
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        # Created on first use: an aiohttp session binds to the running loop.
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> MeshClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def submit(
        self,
        agent: str,
        input: Any,
        *,
        idempotency_key: str | None = None,
        tenant: str | None = None,
        priority: int | None = None,
        labels: dict[str, str] | None = None,
        timeout_s: float | None = None,
        max_attempts: int | None = None,
        budget: dict[str, int] | None = None,
        isolation: str | None = None,
        memory_limit_mb: int | None = None,
        session: str | None = None,
        placement: str | None = None,
    ) -> dict[str, Any]:
        """Submit a run; returns {"id", "status"} once a majority committed it."""
        body: dict[str, Any] = {"agent": agent, "input": input}
        optional = {
            "idempotency_key": idempotency_key,
            "tenant": tenant,
            "priority": priority,
            "labels": labels,
            "timeout_s": timeout_s,
            "max_attempts": max_attempts,
            "budget": budget,
            "isolation": isolation,
            "memory_limit_mb": memory_limit_mb,
            "session": session,
            "placement": placement,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        return await self._request("POST", "/v1/runs", json=body)

    async def get_run(self, id: str) -> dict[str, Any]:
        return await self._request("GET", f"/v1/runs/{id}")

    async def list_runs(
        self,
        status: str | None = None,
        limit: int | None = None,
        tenant: str | None = None,
        agent: str | None = None,
        offset: int | None = None,
    ) -> dict[str, Any]:
        given = (
            ("status", status),
            ("limit", limit),
            ("tenant", tenant),
            ("agent", agent),
            ("offset", offset),
        )
        params = {k: str(v) for k, v in given if v is not None}
        return await self._request("GET", "/v1/runs", params=params)

    async def steps(self, id: str) -> dict[str, Any]:
        """The run's step journal and its owners by epoch: {"steps", "owners"}."""
        return await self._request("GET", f"/v1/runs/{id}/steps")

    async def diagnostics(self) -> dict[str, Any]:
        """This peer's pass/warn/fail checks: {"peer", "status", "checks", "notes"}."""
        return await self._request("GET", "/v1/diagnostics")

    async def metrics_text(self) -> str:
        async with self._http().get(self.base_url + "/metrics") as resp:
            if resp.status >= 300:
                raise await _error_from(resp)
            return await resp.text()

    async def cancel(self, id: str) -> dict[str, Any]:
        """Cancel a run; {"id", "status": "cancelled" | "cancelling"}. 409 if it already ended."""
        return await self._request("POST", f"/v1/runs/{id}/cancel")

    async def retry(self, id: str) -> dict[str, Any]:
        """Re-queue a failed or timed-out run (a dead letter) under its own id."""
        return await self._request("POST", f"/v1/runs/{id}/retry")

    async def pause(self, id: str) -> dict[str, Any]:
        """Pause a run; its view: ``paused`` at once if it was queued or waiting,
        ``running`` with ``pause_requested`` until its owner releases it at a
        step boundary. 409 if it already ended."""
        return await self._request("POST", f"/v1/runs/{id}/pause")

    async def resume(self, id: str) -> dict[str, Any]:
        """Resume a paused run (back to ``queued``); its view. 409 if it is not paused."""
        return await self._request("POST", f"/v1/runs/{id}/resume")

    async def signal(
        self, id: str, name: str, data: Any, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Send the run signal ``name``; {"run_id", "name", "seq", "duplicate"}
        once it is committed. The same key again is delivered once."""
        body: dict[str, Any] = {"data": data}
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        return await self._request(
            "POST", f"/v1/runs/{id}/signals/{quote(name, safe='')}", json=body
        )

    async def cluster(self) -> dict[str, Any]:
        return await self._request("GET", "/v1/cluster")

    async def join(self, id: str, http: str, raft: str | None, role: str) -> dict[str, Any]:
        """Admit a new peer through this one; returns {"id", "role", "voters"}."""
        body = {"id": id, "http": http, "raft": raft, "role": role}
        return await self._request("POST", "/v1/peers", json=body)

    async def peer(self, id: str) -> dict[str, Any]:
        return await self._request("GET", f"/v1/peers/{id}")

    async def drain(self, id: str, release: bool = False) -> dict[str, Any]:
        return await self._request("POST", f"/v1/peers/{id}/drain", json={"release": release})

    async def undrain(self, id: str) -> dict[str, Any]:
        return await self._request("POST", f"/v1/peers/{id}/undrain")

    async def leave(self, id: str, release: bool = False) -> dict[str, Any]:
        """Drain ``id`` and remove it; answered once it is out of the mesh."""
        return await self._request("POST", f"/v1/peers/{id}/leave", json={"release": release})

    # -- schedules -------------------------------------------------------------

    async def add_schedule(
        self,
        id: str,
        agent: str,
        input: Any,
        *,
        cron: str | None = None,
        every_s: float | None = None,
        timezone: str | None = None,
        tenant: str | None = None,
        overlap: str | None = None,
        catchup: str | None = None,
    ) -> dict[str, Any]:
        """Create a schedule (exactly one of ``cron`` and ``every_s``); the
        same id and definition again answers the existing schedule."""
        body: dict[str, Any] = {"id": id, "agent": agent, "input": input}
        optional = {
            "cron": cron,
            "every_s": every_s,
            "timezone": timezone,
            "tenant": tenant,
            "overlap": overlap,
            "catchup": catchup,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        return await self._request("POST", "/v1/schedules", json=body)

    async def schedules(self) -> dict[str, Any]:
        return await self._request("GET", "/v1/schedules")

    async def schedule(self, id: str) -> dict[str, Any]:
        return await self._request("GET", f"/v1/schedules/{id}")

    async def delete_schedule(self, id: str) -> dict[str, Any]:
        return await self._request("DELETE", f"/v1/schedules/{id}")

    async def pause_schedule(self, id: str) -> dict[str, Any]:
        return await self._request("POST", f"/v1/schedules/{id}/pause")

    async def resume_schedule(self, id: str) -> dict[str, Any]:
        return await self._request("POST", f"/v1/schedules/{id}/resume")

    async def wait(self, id: str, timeout_s: float, poll_s: float = 0.2) -> dict[str, Any]:
        """Poll until the run is terminal; raises TimeoutError after ``timeout_s``.

        A 503 (no quorum, e.g. during a leader election) is waited out rather
        than raised: the run is still progressing and the caller asked to wait.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                run = await self.get_run(id)
            except MeshHTTPError as exc:
                if exc.status != 503:
                    raise
            else:
                if run.get("status") in TERMINAL_STATUSES:
                    return run
            if time.monotonic() >= deadline:
                raise TimeoutError(f"run {id} did not finish within {timeout_s:g} s")
            await asyncio.sleep(poll_s)

    async def agents(self) -> dict[str, Any]:
        return await self._request("GET", "/v1/agents")

    async def events(self, id: str, last_event_id: int | None = None) -> AsyncIterator[SSEMessage]:
        """Follow a run's events (Server-Sent Events) until its ``end`` event.

        Resumes after ``last_event_id`` when given. The stream has no overall
        timeout: a run may take hours; a cut connection raises aiohttp's error
        and the caller resumes with the last id it saw.
        """
        headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._timeout.total)
        async with self._http().get(
            f"{self.base_url}/v1/runs/{id}/events", headers=headers, timeout=timeout
        ) as resp:
            if resp.status >= 300:
                raise await _error_from(resp)
            fields: dict[str, str] = {}
            async for raw in resp.content:
                line = raw.decode().rstrip("\r\n")
                if line:
                    if not line.startswith(":"):
                        name, _, value = line.partition(":")
                        fields[name] = value.removeprefix(" ")
                    continue
                if "data" in fields:
                    msg = SSEMessage(
                        event=fields.get("event", "message"),
                        data=json.loads(fields["data"]),
                        id=int(fields["id"]) if "id" in fields else None,
                    )
                    yield msg
                    if msg.event == "end":
                        return
                fields = {}

    async def healthz(self) -> bool:
        return await self._probe("/healthz")

    async def readyz(self) -> bool:
        return await self._probe("/readyz")

    async def readiness(self) -> tuple[bool, str]:
        """/readyz's verdict with its reason (e.g. "storage unreachable: ...");
        unlike ``readyz`` an unreachable peer raises, so callers can tell the two apart."""
        async with self._http().get(self.base_url + "/readyz") as resp:
            try:
                reason = str((await resp.json(content_type=None)).get("reason", ""))
            except (ValueError, AttributeError):
                reason = (await resp.text()).strip()
            return resp.status == 200, reason

    async def metrics(self) -> str:
        """The peer's Prometheus exposition text."""
        async with self._http().get(self.base_url + "/metrics") as resp:
            if resp.status >= 300:
                raise await _error_from(resp)
            return await resp.text()

    async def _probe(self, path: str) -> bool:
        """Probes answer a yes/no question, so an unreachable peer is a no."""
        try:
            async with self._http().get(self.base_url + path) as resp:
                await resp.read()
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        async with self._http().request(method, self.base_url + path, **kwargs) as resp:
            if resp.status >= 300:
                raise await _error_from(resp)
            data: dict[str, Any] = await resp.json()
            return data

    def sibling(self, http: str, timeout_s: float | None = None) -> MeshClient:
        """A client of another peer (its advertised HOST:PORT), with this one's
        scheme, token and CA."""
        scheme = self.base_url.partition("://")[0]
        token = self._headers.get("Authorization", "").removeprefix("Bearer ") or None
        timeout = self._timeout.total if timeout_s is None else timeout_s
        return MeshClient(f"{scheme}://{http}", token, timeout or 10, self._ca)

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=client_context(self._ca)) if self._ca else None
            self._session = aiohttp.ClientSession(
                headers=self._headers, timeout=self._timeout, connector=connector
            )
        return self._session


async def _error_from(resp: aiohttp.ClientResponse) -> MeshHTTPError:
    """Parse {"error": {"code", "message"}}; a proxy or a crash may send anything else."""
    text = await resp.text()
    code, message = f"http_{resp.status}", text.strip() or (resp.reason or "")
    try:
        error = (await resp.json(content_type=None))["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        pass
    retry_after: float | None
    try:
        retry_after = float(resp.headers["Retry-After"])
    except (KeyError, ValueError):
        retry_after = None
    return MeshHTTPError(resp.status, code, message, retry_after)
