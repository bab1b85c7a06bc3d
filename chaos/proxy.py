"""TCP proxies the harness puts in front of every link it may want to cut.

One ``Link`` per directed connection path (peer A dialling peer B's Raft port,
peer A posting heartbeats to peer B's HTTP port, every peer reaching the
database). A link is ``up`` (bytes flow), ``dropped`` (a partition: open
connections stay open but every byte is silently discarded, and new ones are
accepted into the same black hole, as when packets vanish on a real network)
or ``refused`` (the far side is gone: open connections are reset and new ones
closed at once, as when a database restarts). Healing a dropped link closes
the black-holed connections, since their byte streams lost data and cannot
resume; the endpoints reconnect as they would after a real partition.

No root is needed: peers are told to dial the proxy (``MESH_DIAL``) while
still announcing and knowing each other by their real addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass, field

log = logging.getLogger("chaos.proxy")

UP = "up"
DROPPED = "dropped"
REFUSED = "refused"

_CHUNK = 65536


@dataclass(eq=False)
class _Pipe:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for writer in (self.client, self.upstream):
            if writer is not None:
                _abort(writer)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Reset rather than close gracefully: a cut link must not linger."""
    transport = writer.transport
    if transport.is_closing():
        return
    with contextlib.suppress(OSError):
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
    transport.abort()


class Link:
    """Forwards ``listen`` → ``target`` while up."""

    def __init__(self, name: str, target: str, host: str = "127.0.0.1") -> None:
        self.name = name
        self.target = target
        self._host = host
        self.state = UP
        self._server: asyncio.Server | None = None
        self._pipes: set[_Pipe] = set()
        self.port = 0

    @property
    def listen(self) -> str:
        return f"{self._host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self._host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        for pipe in list(self._pipes):
            pipe.close()
        self._pipes.clear()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def set_state(self, state: str) -> None:
        if state == self.state:
            return
        previous, self.state = self.state, state
        if state == REFUSED or (previous == DROPPED and state == UP):
            for pipe in list(self._pipes):
                pipe.close()
            self._pipes.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.state == REFUSED:
            _abort(writer)
            return
        pipe = _Pipe(writer)
        self._pipes.add(pipe)
        try:
            if self.state == UP:
                host, _, port = self.target.rpartition(":")
                try:
                    up_reader, up_writer = await asyncio.open_connection(host, int(port))
                except OSError:
                    pipe.close()
                    return
                if self.state != UP:
                    up_writer.transport.abort()
                    pipe.close()
                    return
                pipe.upstream = up_writer
                pipe.tasks = [
                    asyncio.ensure_future(self._pump(reader, up_writer)),
                    asyncio.ensure_future(self._pump(up_reader, writer)),
                ]
            else:
                pipe.tasks = [asyncio.ensure_future(self._swallow(reader))]
            await asyncio.gather(*pipe.tasks, return_exceptions=True)
        finally:
            pipe.close()
            self._pipes.discard(pipe)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                if self.state != UP:
                    # Partitioned mid-stream: swallow from now on.
                    continue
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            if writer.can_write_eof() and not writer.transport.is_closing():
                with contextlib.suppress(OSError):
                    writer.write_eof()

    async def _swallow(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while await reader.read(_CHUNK):
                pass


class Proxies:
    """All links of one chaos run, by name."""

    def __init__(self) -> None:
        self.links: dict[str, Link] = {}

    async def add(self, name: str, target: str) -> Link:
        link = Link(name, target)
        await link.start()
        self.links[name] = link
        return link

    def set(self, names: list[str], state: str) -> None:
        for name in names:
            self.links[name].set_state(state)

    def heal_all(self) -> None:
        for link in self.links.values():
            link.set_state(UP)

    async def close(self) -> None:
        await asyncio.gather(*(link.close() for link in self.links.values()))
