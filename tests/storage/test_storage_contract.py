"""The Store contract, run against PostgreSQL and SQLite alike."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from storage_support import MakeStore, Target

from raftmesh.consensus.spec import SPEC_FIELDS, RunSpec
from raftmesh.storage import AlreadyFinished, RunRow, StaleEpoch, Step, StorageUnavailable, Store


def make_run(run_id: str = "r1", **fields: Any) -> RunRow:
    spec = {k: fields.pop(k) for k in list(fields) if k in SPEC_FIELDS}
    spec.setdefault("agent", "echo")
    spec.setdefault("input", b"\x81\xa1q\xa2hi")
    return RunRow(id=run_id, spec=RunSpec(**spec), **fields)


async def claimed(store: Store, run_id: str = "r1", epoch: int = 1, peer: str = "p1") -> RunRow:
    claim = await store.claim(make_run(run_id), epoch, peer, now_ms=100 * epoch)
    return claim.run


async def test_migrations_apply_once_when_opened_again(
    target: Target, make_store: MakeStore
) -> None:
    first = await make_store(target.url)
    await first.record_runs([make_run()])
    await first.close()

    again = await make_store(target.url)

    assert await target.applied_versions() == [1, 2, 3, 4]
    assert await again.get_run("r1") is not None


async def test_concurrent_opens_migrate_once(target: Target, make_store: MakeStore) -> None:
    stores = await asyncio.gather(*(make_store(target.url) for _ in range(4)))

    assert await target.applied_versions() == [1, 2, 3, 4]
    for store in stores:
        await store.ping()


async def test_record_runs_is_idempotent(store: Store) -> None:
    original = make_run(tenant="acme", priority=3, labels={"gpu": "a100"}, submitted_at_ms=7)
    await store.record_runs([original])
    await store.claim(original, 1, "p1", now_ms=10)

    await store.record_runs([make_run(agent="other", tenant="evil"), make_run("r2")])

    row = await store.get_run("r1")
    assert row is not None
    assert (row.spec.agent, row.spec.tenant, row.status, row.epoch) == (
        "echo",
        "acme",
        "running",
        1,
    )
    assert row.spec.labels == {"gpu": "a100"}
    assert await store.get_run("r2") is not None


async def test_record_runs_stores_every_field_as_queued(store: Store) -> None:
    spec = RunSpec(
        agent="echo",
        input=b"\x81\xa1q\xa2hi",
        tenant="acme",
        priority=-2,
        labels={"zone": "eu", "gpu": "1"},
        timeout_s=12.5,
        max_attempts=3,
        idempotency_key="idem",
        parent_id="p0",
        depth=2,
        budget={"tokens": 900},
        isolation="process",
        memory_limit_mb=300,
        session="s-1",
        placement="consistent-hash",
    )
    run = RunRow(
        id="r1",
        spec=spec,
        submitted_at_ms=1_700_000_000_123,
        status="running",
        owner="ignored",
        epoch=9,
    )
    await store.record_runs([run])

    assert await store.get_run("r1") == RunRow(
        id="r1", spec=spec, submitted_at_ms=1_700_000_000_123
    )


async def test_claim_bumps_epoch_and_attempts(store: Store) -> None:
    await store.record_runs([make_run()])

    first = await store.claim(make_run(), 1, "p1", now_ms=10)
    second = await store.claim(make_run(), 3, "p2", now_ms=20)

    assert not first.finished and not second.finished
    assert (first.run.epoch, first.run.attempts, first.run.owner) == (1, 1, "p1")
    assert (second.run.epoch, second.run.attempts, second.run.owner) == (3, 2, "p2")
    assert (second.run.status, second.run.started_at_ms) == ("running", 20)


async def test_claim_inserts_a_run_storage_has_not_seen(store: Store) -> None:
    claim = await store.claim(make_run(labels={"a": "b"}), 1, "p1", now_ms=10)

    assert claim.run.status == "running"
    assert (claim.run.epoch, claim.run.attempts, claim.run.spec.labels) == (1, 1, {"a": "b"})
    assert await store.get_run("r1") == claim.run


@pytest.mark.parametrize("stale_epoch", [2, 1])
async def test_claim_with_an_epoch_not_newer_is_stale(store: Store, stale_epoch: int) -> None:
    await claimed(store, epoch=2)

    with pytest.raises(StaleEpoch) as raised:
        await store.claim(make_run(), stale_epoch, "p9", now_ms=999)

    assert (raised.value.epoch, raised.value.current) == (stale_epoch, 2)
    row = await store.get_run("r1")
    assert row is not None and (row.owner, row.attempts) == ("p1", 1)


async def test_older_epoch_writes_are_fenced_and_leave_nothing(store: Store) -> None:
    await claimed(store, epoch=1, peer="old")
    await claimed(store, epoch=2, peer="new")

    with pytest.raises(StaleEpoch) as step_refused:
        await store.put_step("r1", 1, 1, "plan", b"x", "old", 300)
    with pytest.raises(StaleEpoch) as event_refused:
        await store.append_event("r1", 1, "progress", b"x", 300)
    with pytest.raises(StaleEpoch) as result_refused:
        await store.put_result("r1", 1, "succeeded", b"x", None, 300)

    for refused in (step_refused, event_refused, result_refused):
        assert (refused.value.epoch, refused.value.current) == (1, 2)
    assert await store.load_steps("r1") == []
    assert await store.read_events("r1") == []
    row = await store.get_run("r1")
    assert row is not None
    assert (row.status, row.result, row.finished_at_ms, row.owner) == ("running", None, None, "new")


async def test_writes_to_a_never_claimed_run_are_fenced(store: Store) -> None:
    await store.record_runs([make_run("queued")])

    with pytest.raises(StaleEpoch):
        await store.put_step("missing", 1, 1, "plan", b"x", "p1", 1)
    with pytest.raises(StaleEpoch):
        await store.append_event("missing", 1, "k", b"x", 1)
    with pytest.raises(StaleEpoch):
        await store.put_result("queued", 1, "succeeded", b"x", None, 1)

    assert await store.get_run("missing") is None


async def test_current_epoch_writes_are_stored(store: Store) -> None:
    await claimed(store, epoch=4)

    await store.put_step("r1", 4, 2, "answer", b"b", "p1", 11)
    await store.put_step("r1", 4, 1, "plan", b"a", "p1", 10)
    await store.put_result("r1", 4, "failed", None, "boom", 12)

    assert await store.load_steps("r1") == [
        Step(1, "plan", b"a", 4, "p1", 10),
        Step(2, "answer", b"b", 4, "p1", 11),
    ]
    row = await store.get_run("r1")
    assert row is not None
    assert (row.status, row.result, row.error, row.finished_at_ms) == ("failed", None, "boom", 12)


async def test_a_checkpointed_step_keeps_its_first_value(store: Store) -> None:
    await claimed(store, epoch=1)
    await store.put_step("r1", 1, 1, "plan", b"first", "p1", 10)
    await claimed(store, epoch=2, peer="p2")

    await store.put_step("r1", 2, 1, "plan", b"second", "p2", 20)

    assert await store.load_steps("r1") == [Step(1, "plan", b"first", 1, "p1", 10)]


async def test_result_is_written_once(store: Store) -> None:
    await claimed(store, epoch=1)
    await store.put_result("r1", 1, "succeeded", b"answer", None, 50)

    with pytest.raises(AlreadyFinished) as raised:
        await store.put_result("r1", 1, "failed", None, "late", 60)
    await store.set_terminal("r1", "cancelled", "too late", 70)

    assert isinstance(raised.value, StaleEpoch)
    row = await store.get_run("r1")
    assert row is not None
    assert (row.status, row.result, row.error, row.finished_at_ms) == (
        "succeeded",
        b"answer",
        None,
        50,
    )


async def test_claim_on_a_finished_run_keeps_the_result_and_fences_its_writer(
    store: Store,
) -> None:
    await claimed(store, epoch=1, peer="p1")
    await store.put_result("r1", 1, "succeeded", b"answer", None, 50)

    claim = await store.claim(make_run(), 2, "p2", now_ms=60)

    assert claim.finished
    assert (claim.run.status, claim.run.result, claim.run.epoch) == ("succeeded", b"answer", 2)
    assert (claim.run.attempts, claim.run.started_at_ms) == (1, 100)
    with pytest.raises(StaleEpoch):
        await store.append_event("r1", 1, "late", b"", 70)


async def test_set_terminal_finishes_an_unowned_run(store: Store) -> None:
    await store.record_runs([make_run()])

    await store.set_terminal("r1", "cancelled", "by user", 30)
    claim = await store.claim(make_run(), 1, "p1", now_ms=40)

    assert claim.finished
    assert (claim.run.status, claim.run.error, claim.run.finished_at_ms) == (
        "cancelled",
        "by user",
        30,
    )


async def test_non_terminal_outcomes_are_refused(store: Store) -> None:
    await claimed(store, epoch=1)

    with pytest.raises(ValueError):
        await store.put_result("r1", 1, "running", None, None, 1)
    with pytest.raises(ValueError):
        await store.set_terminal("r1", "queued", None, 1)


async def test_events_are_numbered_from_one_and_read_after_a_seq(store: Store) -> None:
    await claimed(store, epoch=1)
    await claimed(store, "other", epoch=1)

    seqs = [await store.append_event("r1", 1, "progress", bytes([i]), 10 + i) for i in range(5)]
    assert await store.append_event("other", 1, "progress", b"", 1) == 1

    assert seqs == [1, 2, 3, 4, 5]
    after_two = await store.read_events("r1", after_seq=2)
    assert [(e.seq, e.data, e.at_ms, e.epoch) for e in after_two] == [
        (3, b"\x02", 12, 1),
        (4, b"\x03", 13, 1),
        (5, b"\x04", 14, 1),
    ]
    assert [e.seq for e in await store.read_events("r1", after_seq=1, limit=2)] == [2, 3]
    assert await store.read_events("r1", after_seq=5) == []


async def test_concurrent_appends_from_two_peers_get_distinct_seqs(
    target: Target, store: Store, make_store: MakeStore
) -> None:
    other_peer = await make_store(target.url)
    await claimed(store, epoch=1)

    seqs = await asyncio.gather(
        *(
            peer.append_event("r1", 1, "tick", b"", i)
            for i in range(20)
            for peer in (store, other_peer)
        )
    )

    assert sorted(seqs) == list(range(1, 41))
    assert [e.seq for e in await store.read_events("r1")] == list(range(1, 41))


async def test_list_runs_filters_by_status_newest_first(store: Store) -> None:
    await store.record_runs([make_run(f"r{i}", submitted_at_ms=1000 + i) for i in range(5)])
    await store.record_runs([make_run("tie", submitted_at_ms=1004)])
    for run_id in ("r1", "r3"):
        await store.claim(make_run(run_id), 1, "p1", now_ms=2000)

    assert [r.id for r in await store.list_runs()] == ["tie", "r4", "r3", "r2", "r1", "r0"]
    assert [r.id for r in await store.list_runs(limit=2)] == ["tie", "r4"]
    assert [r.id for r in await store.list_runs(status="running")] == ["r3", "r1"]
    assert [r.id for r in await store.list_runs(status="queued", limit=2)] == ["tie", "r4"]
    assert await store.list_runs(status="succeeded") == []


async def test_list_runs_filters_by_tenant_and_agent_and_pages(store: Store) -> None:
    await store.record_runs(
        [
            make_run(
                f"r{i}",
                agent="a" if i % 2 else "b",
                tenant="t1" if i < 4 else "t2",
                submitted_at_ms=1000 + i,
            )
            for i in range(8)
        ]
    )
    await store.claim(make_run("r1"), 1, "p1", now_ms=2000)

    assert [r.id for r in await store.list_runs(tenant="t1")] == ["r3", "r2", "r1", "r0"]
    assert [r.id for r in await store.list_runs(agent="a")] == ["r7", "r5", "r3", "r1"]
    assert [r.id for r in await store.list_runs(tenant="t2", agent="b")] == ["r6", "r4"]
    assert [r.id for r in await store.list_runs(status="queued", tenant="t1", agent="a")] == ["r3"]
    assert [r.id for r in await store.list_runs(limit=3, offset=2)] == ["r5", "r4", "r3"]
    assert [r.id for r in await store.list_runs(agent="a", limit=2, offset=2)] == ["r3", "r1"]
    assert await store.list_runs(tenant="nobody") == []


async def test_a_closed_store_is_unavailable(target: Target, make_store: MakeStore) -> None:
    closed = await make_store(target.url)
    await closed.close()

    with pytest.raises(StorageUnavailable):
        await closed.ping()


async def test_reopen_requeues_a_dead_letter_and_fences_by_epoch(store: Store) -> None:
    await claimed(store, epoch=1, peer="p1")
    await store.put_step("r1", 1, 0, "plan", b"kept", "p1", 20)
    await store.set_terminal("r1", "failed", "boom", 30)

    assert await store.reopen("r1")
    row = await store.get_run("r1")
    assert row is not None
    assert (row.status, row.result, row.error, row.finished_at_ms, row.epoch) == (
        "queued",
        None,
        None,
        None,
        1,
    )
    claim = await store.claim(make_run(), 2, "p2", now_ms=40)
    assert not claim.finished
    assert [s.value for s in await store.load_steps("r1")] == [b"kept"]
    with pytest.raises(StaleEpoch):
        await store.put_result("r1", 1, "succeeded", b"late", None, 50)


async def test_reopen_refuses_what_is_not_a_dead_letter(store: Store) -> None:
    await claimed(store, epoch=1, peer="p1")
    assert not await store.reopen("r1")
    await store.put_result("r1", 1, "succeeded", b"answer", None, 50)
    assert not await store.reopen("r1")
    assert not await store.reopen("nobody")
    row = await store.get_run("r1")
    assert row is not None and row.status == "succeeded"
