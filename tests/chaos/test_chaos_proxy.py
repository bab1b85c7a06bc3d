"""The harness proxy: up forwards, dropped black-holes, refused resets, healing reconnects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from raftmesh.chaos.proxy import DROPPED, REFUSED, UP, Link


@pytest.fixture
async def echo() -> AsyncIterator[str]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1024):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    server.close()
    await server.wait_closed()


async def connect(link: Link) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", link.port)


async def roundtrip(link: Link, payload: bytes) -> bytes:
    reader, writer = await connect(link)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(payload)), 2)
    finally:
        writer.close()


async def test_link_states(echo: str) -> None:
    link = Link("test", echo)
    await link.start()
    try:
        assert await roundtrip(link, b"hello") == b"hello"

        reader, writer = await connect(link)
        writer.write(b"a")
        assert await reader.readexactly(1) == b"a"
        link.set_state(DROPPED)
        writer.write(b"lost")
        await writer.drain()
        with pytest.raises(TimeoutError):  # a partition: silence, no error
            await asyncio.wait_for(reader.read(10), 0.5)
        with pytest.raises(TimeoutError):  # new connections vanish too
            await roundtrip(link, b"x")
        link.set_state(UP)
        # Healing ends the black-holed stream (it lost bytes) ...
        try:
            assert await asyncio.wait_for(reader.read(10), 2) == b""
        except ConnectionResetError:
            pass
        writer.close()
        # ... and new connections get through again.
        assert await roundtrip(link, b"back") == b"back"

        link.set_state(REFUSED)
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await roundtrip(link, b"x")
        link.set_state(UP)
        assert await roundtrip(link, b"again") == b"again"
    finally:
        await link.close()
