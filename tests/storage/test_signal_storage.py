"""Signals in storage (issue 11), against PostgreSQL and SQLite alike: a
run's mailbox, seqs dense from 0 per name, one signal per idempotency key
even when two peers store it at the same moment."""

from __future__ import annotations

import asyncio

from storage_support import MakeStore, Target

from raftmesh.storage import SignalRow, SignalStored, Store


async def test_seqs_count_from_zero_per_run_and_name(store: Store) -> None:
    assert await store.put_signal("r1", "go", b"a", None, 10) == SignalStored(0, True)
    assert await store.put_signal("r1", "go", b"b", None, 11) == SignalStored(1, True)
    assert await store.put_signal("r1", "stop", b"c", None, 12) == SignalStored(0, True)
    assert await store.put_signal("r2", "go", b"d", None, 13) == SignalStored(0, True)

    assert await store.get_signal("r1", "go", 0) == b"a"
    assert await store.get_signal("r1", "go", 1) == b"b"
    assert await store.get_signal("r1", "go", 2) is None
    assert await store.get_signal("r9", "go", 0) is None
    assert await store.list_signals("r1") == [
        SignalRow("r1", "go", 0, b"a", None, 10),
        SignalRow("r1", "go", 1, b"b", None, 11),
        SignalRow("r1", "stop", 0, b"c", None, 12),
    ]


async def test_a_repeated_key_stores_nothing_and_answers_the_first_seq(store: Store) -> None:
    assert await store.put_signal("r1", "go", b"first", "k", 10) == SignalStored(0, True)
    assert await store.put_signal("r1", "go", b"other", None, 11) == SignalStored(1, True)
    assert await store.put_signal("r1", "go", b"again", "k", 12) == SignalStored(0, False)
    # a key is scoped to its run and name
    assert await store.put_signal("r1", "stop", b"x", "k", 13) == SignalStored(0, True)
    assert await store.put_signal("r2", "go", b"y", "k", 14) == SignalStored(0, True)
    assert [s.data for s in await store.list_signals("r1")] == [b"first", b"other", b"x"]


async def test_signals_survive_a_reopen(target: Target, make_store: MakeStore) -> None:
    first = await make_store(target.url)
    await first.put_signal("r1", "go", b"kept", "k", 10)
    await first.close()
    again = await make_store(target.url)
    assert await again.get_signal("r1", "go", 0) == b"kept"
    assert await again.put_signal("r1", "go", b"dup", "k", 11) == SignalStored(0, False)


async def test_two_peers_storing_at_once_get_dense_seqs_and_one_signal_per_key(
    target: Target, make_store: MakeStore
) -> None:
    """Two stores on one database (two peers) race: 20 signals without a key
    get 20 distinct seqs 0..19, and 10 puts of one key store it once."""
    peers = [await make_store(target.url) for _ in range(2)]
    plain = await asyncio.gather(
        *(peers[i % 2].put_signal("r1", "go", b"%d" % i, None, i) for i in range(20))
    )
    assert sorted(s.seq for s in plain) == list(range(20))
    assert all(s.created for s in plain)

    keyed = await asyncio.gather(
        *(peers[i % 2].put_signal("r1", "once", b"%d" % i, "k", i) for i in range(10))
    )
    assert {s.seq for s in keyed} == {0}
    assert sum(s.created for s in keyed) == 1
    assert len([s for s in await peers[0].list_signals("r1") if s.name == "once"]) == 1
