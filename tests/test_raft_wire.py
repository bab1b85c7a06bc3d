"""Raft frames: what raftmesh sends must stay what pysyncobj reads."""

from __future__ import annotations

import zlib

from hypothesis import given, settings
from hypothesis import strategies as st

from raftmesh.consensus.raft_port import STORED_UP_TO_BYTES, zlib_frame


@settings(max_examples=200, deadline=None)
@given(
    st.binary(max_size=3 * STORED_UP_TO_BYTES) | st.sampled_from([b"", b"x" * 65535, b"y" * 65536])
)
def test_every_frame_is_a_zlib_stream_of_the_message(raw: bytes) -> None:
    # pysyncobj's reader (ours, and any plain pysyncobj peer's) is zlib.decompress
    assert zlib.decompress(zlib_frame(raw)) == raw


def test_hot_path_messages_are_stored_not_deflated() -> None:
    """Deflate's setup alone cost ~20 µs a message, the largest cost of a Raft
    message on a loaded leader: up to 64 KiB a frame is the message plus 11 bytes."""
    response = b"\x80\x04" + b"append_entries_response" * 4
    assert len(zlib_frame(response)) == len(response) + 11
    big = bytes(200_000)
    assert len(zlib_frame(big)) < len(big) // 10, "a snapshot-sized message still deflates"
