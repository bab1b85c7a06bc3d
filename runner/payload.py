"""The payload codec: how inputs, step values, events and results are stored.

msgpack, never pickle: payloads come from callers and agents, and a stored
payload is read by every peer. One module, so storage, the runner, the API and
the chaos checker cannot disagree about the encoding.
"""

from __future__ import annotations

from typing import Any

import msgpack


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def event_data(payload: bytes) -> Any:
    """The data an agent emitted, from a stored event's payload."""
    return unpack(payload)["data"]


def event_place(payload: bytes) -> tuple[int, int]:
    """Where in the agent's flow a stored event was emitted (see RunContext.emit)."""
    seg, rank = unpack(payload)["at"]
    return seg, rank
