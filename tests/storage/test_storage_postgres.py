"""PostgreSQL behaviour beyond the shared contract: schemas, NOTIFY, outages."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest
from storage_support import PG_URL, MakeStore, Target

from raftmesh.consensus.spec import RunSpec
from raftmesh.storage import AlreadyFinished, RunRow, StaleEpoch, StorageUnavailable
from raftmesh.storage.group_commit import GroupCommit
from raftmesh.storage.postgres import _POOL_MAX_SIZE, PostgresStore

NOTIFY_TIMEOUT_S = 5.0


async def connect_to(target: Target) -> asyncpg.Connection:
    """A connection of its own, outside the store's pool, in the target's schema."""
    return await asyncpg.connect(PG_URL, server_settings={"search_path": f'"{target.pg_schema}"'})


async def claim_run(store: PostgresStore, run_id: str = "r1") -> None:
    await store.claim(RunRow(id=run_id, spec=RunSpec("echo", input=b"")), 1, "p1", 0)


async def test_tables_live_in_the_schema_named_by_the_url(
    pg_target: Target, make_store: MakeStore
) -> None:
    await make_store(pg_target.url)

    conn = await asyncpg.connect(PG_URL)
    try:
        tables = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1",
            pg_target.pg_schema,
        )
    finally:
        await conn.close()
    assert {t["table_name"] for t in tables} == {
        "runs",
        "steps",
        "events",
        "schema_migrations",
        "graph_checkpoints",
        "graph_blobs",
        "graph_writes",
        "signals",
    }


def test_events_channel_is_a_plain_identifier_per_schema() -> None:
    assert PostgresStore(f"{PG_URL}?schema=t_abc").events_channel == "raftmesh_events_t_abc"
    assert PostgresStore(f"{PG_URL}?schema=Tenant-1").events_channel == "raftmesh_events_tenant_1"
    assert PostgresStore(PG_URL).events_channel == "raftmesh_events_public"
    assert len(PostgresStore(f"{PG_URL}?schema={'x' * 80}").events_channel) == 63


def test_a_repeated_schema_parameter_is_refused() -> None:
    with pytest.raises(ValueError):
        PostgresStore(f"{PG_URL}?schema=a&schema=b")


async def test_notify_wakes_a_listener_on_another_peer(
    pg_target: Target, make_store: MakeStore
) -> None:
    watcher = await make_store(pg_target.url)
    writer = await make_store(pg_target.url)
    assert isinstance(watcher, PostgresStore) and isinstance(writer, PostgresStore)
    woken: asyncio.Queue[str] = asyncio.Queue()
    await watcher.listen(woken.put_nowait)
    await claim_run(writer)

    await writer.append_event("r1", 1, "progress", b"", 1)

    assert await asyncio.wait_for(woken.get(), NOTIFY_TIMEOUT_S) == "r1"


async def test_events_appended_at_once_wake_every_run_in_fewer_notifications(
    pg_target: Target, make_store: MakeStore
) -> None:
    """A notification is not sent in its event's transaction (the server lets
    one notifying transaction commit at a time): run ids whose events commit
    while a wake-up is being sent go together in the next, each run once."""
    watcher = await make_store(pg_target.url)
    writer = await make_store(pg_target.url)
    assert isinstance(watcher, PostgresStore) and isinstance(writer, PostgresStore)
    woken: asyncio.Queue[str] = asyncio.Queue()
    await watcher.listen(woken.put_nowait)
    runs = [f"r{i}" for i in range(20)]
    for run_id in runs:
        await claim_run(writer, run_id)

    appends = [writer.append_event(run_id, 1, "tick", b"", i) for i in range(10) for run_id in runs]
    await asyncio.gather(*appends)

    seen: list[str] = []
    while set(seen) != set(runs):
        seen.append(await asyncio.wait_for(woken.get(), NOTIFY_TIMEOUT_S))
    await asyncio.sleep(0.3)
    while not woken.empty():
        seen.append(woken.get_nowait())
    assert len(seen) < len(appends), f"{len(seen)} notifications for {len(appends)} events"
    for run_id in runs:
        assert [e.seq for e in await writer.read_events(run_id)] == list(range(1, 11))


async def test_listener_comes_back_after_its_connection_is_killed(
    pg_target: Target, make_store: MakeStore
) -> None:
    store = await make_store(pg_target.url)
    assert isinstance(store, PostgresStore)
    woken: asyncio.Queue[str] = asyncio.Queue()
    await store.listen(woken.put_nowait)
    await claim_run(store)

    admin = await asyncpg.connect(PG_URL)
    try:
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE query = $1",
            f'LISTEN "{store.events_channel}"',
        )
    finally:
        await admin.close()
    assert killed == 1

    # Notifications sent before the listener is back are lost by design, so
    # keep appending until one gets through.
    deadline = time.monotonic() + NOTIFY_TIMEOUT_S
    while True:
        await store.append_event("r1", 1, "tick", b"", 0)
        try:
            assert await asyncio.wait_for(woken.get(), 0.2) == "r1"
            return
        except TimeoutError:
            assert time.monotonic() < deadline, "listener never came back"


async def test_an_unreachable_server_is_unavailable() -> None:
    # Port 1 on loopback refuses at once: nothing listens there.
    store = PostgresStore("postgresql://postgres@127.0.0.1:1/test?schema=nowhere")

    with pytest.raises(StorageUnavailable):
        await store.open()
    await store.close()


@pytest.mark.parametrize("write", ["step", "event", "result"])
async def test_a_write_racing_a_newer_claim_waits_for_it_and_is_refused(
    pg_target: Target, make_store: MakeStore, write: str
) -> None:
    """A step, an event or a result is one statement (lock, epoch compare, write): while
    a newer epoch's claim holds the run row, the old owner's write waits for
    it, then sees the newer epoch and stores nothing."""
    store = await make_store(pg_target.url)
    await claim_run(store)
    claimer = await connect_to(pg_target)
    try:
        claim = claimer.transaction()
        await claim.start()
        await claimer.execute("UPDATE runs SET epoch = 2, owner = 'p2' WHERE id = 'r1'")
        stale = asyncio.ensure_future(
            store.put_step("r1", 1, 1, "plan", b"x", "p1", 5)
            if write == "step"
            else store.append_event("r1", 1, "progress", b"x", 5)
            if write == "event"
            else store.put_result("r1", 1, "succeeded", b"x", None, 5)
        )
        await asyncio.sleep(0.3)
        assert not stale.done(), "the write waits for the row the claim holds"
        await claim.commit()
        with pytest.raises(StaleEpoch) as refused:
            await asyncio.wait_for(stale, NOTIFY_TIMEOUT_S)
    finally:
        await claimer.close()
    assert (refused.value.epoch, refused.value.current) == (1, 2)
    assert await store.load_steps("r1") == []
    assert await store.read_events("r1") == []
    row = await store.get_run("r1")
    assert row is not None and (row.status, row.result, row.owner) == ("running", None, "p2")


async def claimed_runs_one_deposed(store: PostgresStore, count: int) -> list[str]:
    """``count`` runs claimed by epoch 1; r7 is claimed again by epoch 2."""
    runs = [f"r{i}" for i in range(count)]
    for run_id in runs:
        await claim_run(store, run_id)
    await store.claim(RunRow(id="r7", spec=RunSpec("echo", input=b"")), 2, "p2", 0)
    return runs


def count_statements(group: GroupCommit[Any, Any]) -> list[int]:
    """The size of every statement ``group`` sends from now on."""
    sizes: list[int] = []
    write = group._write

    async def counted(items: list[Any]) -> list[Any]:
        sizes.append(len(items))
        return await write(items)

    group._write = counted
    return sizes


async def test_concurrent_steps_of_many_runs_share_statements_and_each_is_fenced(
    pg_target: Target, make_store: MakeStore
) -> None:
    """Group commit: steps that wait for the pool go together in one statement,
    and each step is still checked against its own run's epoch: the one of a
    deposed owner is refused, the steps beside it in the same statement land."""
    store = await make_store(pg_target.url)
    assert isinstance(store, PostgresStore)
    runs = await claimed_runs_one_deposed(store, 64)
    statements = count_statements(store._steps)
    outcomes = await asyncio.gather(
        *(store.put_step(run_id, 1, 1, "plan", run_id.encode(), "p1", 5) for run_id in runs),
        return_exceptions=True,
    )

    refused = {run_id for run_id, o in zip(runs, outcomes, strict=True) if o is not None}
    assert refused == {"r7"} and isinstance(outcomes[7], StaleEpoch)
    assert (outcomes[7].epoch, outcomes[7].current) == (1, 2)
    assert len(statements) < len(runs) and sum(statements) == len(runs), statements
    assert max(statements) > 1, "some steps shared a statement"
    for run_id in runs:
        stored = [s.value for s in await store.load_steps(run_id)]
        assert stored == ([] if run_id == "r7" else [run_id.encode()])


async def test_concurrent_events_of_many_runs_share_statements_and_each_is_fenced(
    pg_target: Target, make_store: MakeStore
) -> None:
    """Events batch as steps do: each gets the next seq of its own run (two of
    one run in a batch take two), and each is checked against its own run's
    epoch, so a deposed owner's event is refused beside the others."""
    store = await make_store(pg_target.url)
    assert isinstance(store, PostgresStore)
    runs = await claimed_runs_one_deposed(store, 48)
    statements = count_statements(store._events)
    appends = [(run_id, n) for n in range(2) for run_id in runs]
    outcomes = await asyncio.gather(
        *(
            store.append_event(run_id, 1, "tick", f"{run_id}/{n}".encode(), 5)
            for run_id, n in appends
        ),
        return_exceptions=True,
    )

    refused = {
        run_id for (run_id, _), o in zip(appends, outcomes, strict=True) if not isinstance(o, int)
    }
    assert refused == {"r7"}
    assert all(
        isinstance(o, StaleEpoch) for (r, _), o in zip(appends, outcomes, strict=True) if r == "r7"
    )
    assert max(statements) > 1 and sum(statements) == len(appends), statements
    for run_id in runs:
        stored = await store.read_events(run_id)
        expected = set() if run_id == "r7" else {f"{run_id}/{n}".encode() for n in range(2)}
        assert {e.data for e in stored} == expected
        assert [e.seq for e in stored] == list(range(1, len(expected) + 1))


async def test_an_event_that_loses_the_race_for_its_seq_takes_the_next_and_notifies_once(
    pg_target: Target, make_store: MakeStore
) -> None:
    """An append reads MAX(seq) from the snapshot its statement started with.
    Another writer of the same epoch commits an event while this append waits
    for the run row. The append then takes the next seq; it does not fail, it
    does not overwrite, and it sends exactly one notification."""
    store = await make_store(pg_target.url)
    assert isinstance(store, PostgresStore)
    woken: asyncio.Queue[str] = asyncio.Queue()
    await store.listen(woken.put_nowait)
    await claim_run(store)
    other = await connect_to(pg_target)
    try:
        holding = other.transaction()
        await holding.start()
        await other.execute("SELECT 1 FROM runs WHERE id = 'r1' FOR UPDATE")
        racing = asyncio.ensure_future(store.append_event("r1", 1, "mine", b"m", 5))
        await asyncio.sleep(0.3)
        assert not racing.done(), "the append waits for the row the other writer holds"
        await other.execute(
            "INSERT INTO events (run_id, seq, kind, data, epoch, at_ms)"
            " VALUES ('r1', 1, 'theirs', 'x', 1, 4)"
        )
        await holding.commit()
        assert await asyncio.wait_for(racing, NOTIFY_TIMEOUT_S) == 2
    finally:
        await other.close()
    assert [(e.seq, e.kind) for e in await store.read_events("r1")] == [(1, "theirs"), (2, "mine")]
    assert await asyncio.wait_for(woken.get(), NOTIFY_TIMEOUT_S) == "r1"
    await asyncio.sleep(0.3)
    assert woken.empty(), "one event, one notification"


async def test_unsafe_unfenced_writes_land_under_a_stale_epoch(
    pg_target: Target, make_store: MakeStore
) -> None:
    """The chaos checker's debug mode: with fencing off, the one-statement
    writes skip only the epoch compare (a never-claimed run and a stored
    outcome still refuse them)."""
    await make_store(pg_target.url)  # migrations
    unfenced = PostgresStore(pg_target.url, fencing=False)
    await unfenced.open()
    try:
        await unfenced.claim(RunRow(id="r1", spec=RunSpec("echo", input=b"")), 2, "p2", 0)
        await unfenced.put_step("r1", 1, 1, "plan", b"stale", "p1", 5)
        await unfenced.put_result("r1", 1, "succeeded", b"stale", None, 6)
        with pytest.raises(StaleEpoch):
            await unfenced.put_step("never", 1, 1, "plan", b"x", "p1", 5)
        with pytest.raises(AlreadyFinished):
            await unfenced.put_result("r1", 2, "failed", None, "late", 7)
        assert [s.value for s in await unfenced.load_steps("r1")] == [b"stale"]
        row = await unfenced.get_run("r1")
        assert row is not None and (row.status, row.result) == ("succeeded", b"stale")
    finally:
        await unfenced.close()


async def test_a_released_connection_keeps_no_transaction_and_no_lock(
    pg_target: Target, make_store: MakeStore
) -> None:
    """The pool skips asyncpg's reset query on release; what must not outlive
    a release still does not: a transaction left open (and the row lock it
    holds) is rolled back, so the next writer of the run is not blocked, and
    the schema of the URL is still the one every statement sees."""
    store = await make_store(pg_target.url)
    assert isinstance(store, PostgresStore)
    await claim_run(store)
    with pytest.raises(RuntimeError):
        async with store._connection() as conn:
            await conn.execute("BEGIN")
            await conn.execute("SELECT 1 FROM runs WHERE id = 'r1' FOR UPDATE")
            raise RuntimeError("the caller failed inside its transaction")
    for _ in range(_POOL_MAX_SIZE + 1):  # every pool connection, the released one too
        async with store._connection() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT current_schema()") == pg_target.pg_schema
    await asyncio.wait_for(store.put_step("r1", 1, 1, "plan", b"x", "p1", 5), NOTIFY_TIMEOUT_S)
    assert [s.seq for s in await store.load_steps("r1")] == [1]
