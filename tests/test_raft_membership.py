"""Voter-set changes in the pysyncobj binding: real Raft nodes on loopback
sockets, in one process.

A node that catches up from a snapshot takes the snapshot's voter set, which
can be older than the leader sending it: a voter that joined after the
snapshot was taken, then came to lead, is not in it. The 600 s chaos soak of
issue 11 saw such a learner drop its connection to the leader that was
teaching it and wait for promotion until its join expired.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from test_raft_durability import free_ports, propose_retrying, submit

from raftmesh.consensus.raft import RaftNode, RaftTimers

# The first voters compact after a few entries; the late voter never does, so
# the snapshot it hands on keeps the voter set from before it joined.
COMPACTING = RaftTimers(
    compaction_min_entries=20,
    min_election_timeout_s=3.0,
    max_election_timeout_s=4.0,
    leader_fallback_s=6.0,
    connection_timeout_s=4.0,
)
LATE = RaftTimers(min_election_timeout_s=0.3, max_election_timeout_s=0.4)


def node(addr: str | None, partners: list[str], root: Path, name: str, t: RaftTimers) -> RaftNode:
    loop = asyncio.get_running_loop()
    return RaftNode(addr, partners, str(root / name), "test-secret", loop, lambda c, r: None, t)


async def until(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(what)


async def test_a_learner_fed_an_old_snapshot_by_a_newer_voter_keeps_its_leader(
    tmp_path: Path,
) -> None:
    a, b, c, d = (f"127.0.0.1:{p}" for p in free_ports(4))
    first = [node(x, [a, b, c], tmp_path, f"n{i}", COMPACTING) for i, x in enumerate((a, b, c))]
    nodes = list(first)
    try:
        await until(lambda: any(n.is_leader for n in first), 20, "no leader among a, b, c")
        leader = next(n for n in first if n.is_leader)
        for i in range(60):
            await propose_retrying(leader, submit(i))
        await until(
            lambda: (tmp_path / f"n{first.index(leader)}" / "raft.dump").exists(),
            10,
            "the leader never compacted its log",
        )
        await leader.add_voter(d)
        late = node(d, [a, b, c, d], tmp_path, "n3", LATE)
        nodes.append(late)
        await until(lambda: len(late.state.runs) == 60, 20, "the late voter never caught up")
        # The late voter is the only one quick to call an election: with the
        # leader gone it leads, and its snapshot still lists a, b, c only.
        leader.close()
        nodes.remove(leader)
        await until(lambda: late.is_leader, 20, "the late voter did not take the lead")
        await propose_retrying(late, submit(100))

        learner = node(None, [a, b, c, d], tmp_path, "learner", RaftTimers())
        nodes.append(learner)
        await until(
            lambda: len(learner.state.runs) == 61,
            20,
            f"the learner stopped at {len(learner.state.runs)} of 61 runs "
            f"(it knows voters {learner.voters()}, {learner.status()})",
        )
        await propose_retrying(late, submit(101))
        await until(lambda: len(learner.state.runs) == 62, 10, "the learner stopped following")
        assert learner.voters() == sorted([a, b, c, d])
        assert learner.leader_addr == d
    finally:
        for n in nodes:
            n.close()


async def test_a_voter_restarted_on_an_old_snapshot_alone_rejoins_its_leader(
    tmp_path: Path,
) -> None:
    """A voter's dump holds the voter set of its index; the membership changes
    after it live only in the journal. A voter restarted with the dump but not
    the journal behind it (the 600 s soak: a restart right after a snapshot
    install) took the dump's voters, without the leader that joined since: it
    refused the leader's connections, never caught up, and its elections kept
    deposing the leader. It starts from the voters it last knew as well."""
    a, b, c, x, d = (f"127.0.0.1:{p}" for p in free_ports(5))
    old = [a, b, c, x]
    first = [node(v, old, tmp_path, f"n{i}", COMPACTING) for i, v in enumerate(old)]
    nodes = list(first)
    try:
        await until(lambda: any(n.is_leader for n in first), 20, "no leader among the first")
        leader = next(n for n in first if n.is_leader)
        for i in range(60):
            await propose_retrying(leader, submit(i))
        follower = next(n for n in first if n is not leader)
        name = f"n{first.index(follower)}"
        await until(
            lambda: (tmp_path / name / "raft.dump").exists(), 10, "the follower never compacted"
        )
        await leader.add_voter(d)
        late = node(d, [*old, d], tmp_path, "n4", LATE)
        nodes.append(late)
        await until(lambda: len(late.state.runs) == 60, 20, "the late voter never caught up")
        await until(lambda: d in follower.voters(), 10, "the follower never saw d join")
        leader.close()
        nodes.remove(leader)
        await until(lambda: late.is_leader, 20, "the late voter did not take the lead")
        # The follower comes back with its dump (which lists the first four
        # only) and without the journal that added d.
        follower.close()
        nodes.remove(follower)
        for journal in ("raft.journal", "raft.journal.meta"):
            (tmp_path / name / journal).unlink(missing_ok=True)
        for i in (100, 101):
            await propose_retrying(late, submit(i))
        term = late.term
        back = node(follower.self_addr, [*old, d], tmp_path, name, COMPACTING)
        nodes.append(back)
        await until(
            lambda: len(back.state.runs) == 62,
            20,
            f"the restarted voter stopped at {len(back.state.runs)} of 62 runs "
            f"(it knows voters {back.voters()}, {back.status()})",
        )
        assert back.voters() == sorted([*old, d])
        assert late.is_leader and late.term == term, "the restarted voter deposed the leader"
    finally:
        for n in nodes:
            n.close()
