"""Property tests for the replicated run-ownership state machine.

A hypothesis ``RuleBasedStateMachine`` drives ``MeshState.apply`` with random
interleavings of submits, assigns from the current leader, from a deposed
leader planning on an old copy of the state and from nowhere (garbage
triples), finishes and releases from current and stale owners, membership
changes, configuration, replays of applied commands and malformed commands.

Every command goes through the wire form (``encode_entry``/``decode_entry``)
first, as it does in the Raft binding. After each command the test checks the
transition against an independent reference (what should have been accepted,
and that nothing else moved), and after each step the invariants of
shared/DESIGN.md that the state machine is responsible for:

2. epochs per run only move forward; finish/release are accepted only for the
   current owner at the current epoch; an owner is an up peer.
3. a run is finished at most once and is gone from state once finished.
5. one idempotency key, one run, while the key is remembered.
6. no peer above its slots (recomputed from runs), no assign accepted that
   takes a peer above its slots or a tenant above its cap at that moment.

plus: indexes equal a recomputation from runs, a msgpack snapshot round-trips
exactly, a replica restored from a snapshot stays in lockstep, and replaying
the whole log on a fresh state gives the same results and state.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from typing import Any

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from raftmesh.consensus import commands as c
from raftmesh.consensus import results as res
from raftmesh.consensus.model import PEER_DOWN, PEER_UP, Run
from raftmesh.consensus.state import COMMAND_TTL_MS, HANDOFF_SCAN, IDEMPOTENCY_TTL_MS, MeshState
from raftmesh.consensus.status import TERMINAL_STATUSES, RunStatus

PEERS = ["p0", "p1", "p2", "p3"]
TENANTS = ["default", "t0", "t1"]
PEER_LABELS = [{}, {"gpu": "a100"}, {"gpu": "h100"}, {"gpu": "a100", "zone": "eu"}]
RUN_LABELS = [{}, {}, {"gpu": "a100"}, {"gpu": "h100"}, {"zone": "eu"}]
KEYS = ["k0", "k1", "k2", "k3"]
STATUSES = sorted(TERMINAL_STATUSES)
SKEW = st.sampled_from([0, 0, 0, 700])  # proposers' clocks disagree a little

# Garbage is msgpack-native (it has to survive the wire) and its text cannot
# spell a real id ("r3", "p1", "i2", "k0", an op name), so garbage never
# collides with the entities the model tracks by name.
GARBAGE_TEXT = st.text(alphabet="xyz é\x00", max_size=4)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | GARBAGE_TEXT
    | st.binary(max_size=4)
)
GARBAGE = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(GARBAGE_TEXT, inner, max_size=3),
    max_leaves=6,
)
SMALL_INTS = st.integers(-5, 5)
NOT_STR = GARBAGE.filter(lambda v: not isinstance(v, str))
NOT_INT = GARBAGE.filter(lambda v: not isinstance(v, int))
INPUTS = (
    st.none()
    | st.integers(-1000, 1000)
    | st.text(max_size=6)
    | st.lists(st.integers(0, 9), max_size=3)
)


# -- helpers ----------------------------------------------------------------


def wire(command: Any) -> Any:
    """The command as every peer sees it after a trip through the Raft log
    (garbage, which no proposer could encode as a command, goes as it is)."""
    if isinstance(command, c.Command):
        return c.decode_entry(c.encode_entry([command]))[0]
    return msgpack.unpackb(
        msgpack.packb(command, use_bin_type=True), raw=False, strict_map_key=False
    )


def snapshot_roundtrip(state: MeshState) -> MeshState:
    blob = msgpack.packb(state.to_dict(), use_bin_type=True)
    return MeshState.from_dict(msgpack.unpackb(blob, raw=False, strict_map_key=False))


def header_ok(cmd: Any) -> bool:
    return (
        isinstance(cmd, dict)
        and isinstance(cmd.get("cid"), str)
        and isinstance(cmd.get("at_ms"), int)
    )


def hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def recomputed_indexes(state: MeshState) -> tuple[dict[str, set[str]], dict[str, int]]:
    by_owner: dict[str, set[str]] = {}
    tenants: Counter[str] = Counter()
    for run in state.runs.values():
        if run.status == RunStatus.RUNNING:
            by_owner.setdefault(run.owner, set()).add(run.id)
            tenants[run.spec.tenant] += 1
    return by_owner, dict(tenants)


def runs_view(state: MeshState) -> dict[str, dict[str, Any]]:
    return {rid: run.public() for rid, run in state.runs.items()}


def peers_view(state: MeshState) -> dict[str, dict[str, Any]]:
    return {pid: peer.public() for pid, peer in state.peers.items()}


def labels_fit(peer_labels: dict[str, str], run_labels: dict[str, str]) -> bool:
    return all(peer_labels.get(k) == v for k, v in run_labels.items())


def cap_of(state: MeshState, tenant: str) -> int | None:
    return state.tenant_caps.get(tenant, state.default_tenant_cap)


def plan_assignments(state: MeshState, peer_order: list[str], limit: int) -> list[list[Any]]:
    """What a correct leader would propose from its view ``state``."""
    by_owner, tenants = recomputed_indexes(state)
    running = Counter({pid: len(ids) for pid, ids in by_owner.items()})
    tenant_load = Counter(tenants)
    queued = sorted(
        (r for r in state.runs.values() if r.status == RunStatus.QUEUED),
        key=lambda r: (-r.spec.priority, r.submitted_at_ms, r.id),
    )
    batch: list[list[Any]] = []
    for run in queued:
        if len(batch) >= limit:
            break
        cap = cap_of(state, run.spec.tenant)
        if cap is not None and tenant_load[run.spec.tenant] >= cap:
            continue
        for pid in peer_order:
            peer = state.peers[pid]
            if (
                peer.status == PEER_UP
                and running[pid] < peer.slots
                and labels_fit(peer.labels, run.spec.labels)
            ):
                batch.append([run.id, pid, run.epoch + 1])
                running[pid] += 1
                tenant_load[run.spec.tenant] += 1
                break
    return batch


def expected_handoff(pre: MeshState, finished: str, at_ms: int) -> str | None:
    """The run a finish should hand its freed slot to, worked out from the
    runs alone: the first of the queue in aged order (among the first
    HANDOFF_SCAN) that fits the finished run's peer and its tenant's cap."""
    if not pre.handoff:
        return None
    owner = pre.runs[finished].owner
    peer = pre.peers[owner]
    by_owner, tenants = recomputed_indexes(pre)
    if peer.status != PEER_UP or len(by_owner.get(owner, ())) - 1 >= peer.slots:
        return None

    def aged(run: Run) -> int:
        if pre.aging_ms == 0:
            return run.spec.priority
        return run.spec.priority + max(0, at_ms - run.submitted_at_ms) // pre.aging_ms

    queued = sorted(
        (r for r in pre.runs.values() if r.status == RunStatus.QUEUED),
        key=lambda r: (-aged(r), r.submitted_at_ms, r.id),
    )
    tenant_load = Counter(tenants)
    tenant_load[pre.runs[finished].spec.tenant] -= 1
    for run in queued[:HANDOFF_SCAN]:
        cap = cap_of(pre, run.spec.tenant)
        if cap is not None and tenant_load[run.spec.tenant] >= cap:
            continue
        if labels_fit(peer.labels, run.spec.labels):
            return run.id
    return None


# -- the stateful test ------------------------------------------------------


class MeshMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.state = MeshState()
        # Restored from a snapshot of ``state`` now and then, and fed the same
        # commands: it must never drift.
        self.replica = MeshState()
        self.clock = 1_000_000
        self.term = 1
        self.counter = 0
        self.log: list[tuple[Any, dict[str, Any]]] = []
        self.old_states: list[MeshState] = []
        # model
        self.finished: set[str] = set()
        self.finishes: Counter[str] = Counter()
        self.assigned: dict[
            tuple[str, int], tuple[str, Any]
        ] = {}  # (run, epoch) -> (peer, incarnation)
        self.last_epoch: dict[str, int] = {}
        self.ends: list[tuple[str, str, int, str | None, str, int]] = []
        self.incarnations: dict[str, list[str]] = {}
        # (tenant, idempotency key) -> (run id, expiry)
        self.keys: dict[Any, tuple[str, int]] = {}
        self.high_water = 0  # the latest at_ms any applied command carried

    # -- plumbing -----------------------------------------------------------

    def _next(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def _at(self, skew: int = 0) -> int:
        return self.clock - skew

    def execute(self, command: Any, issuer: str | None = None) -> dict[str, Any]:
        cmd = wire(command)
        pre = copy.deepcopy(self.state)
        result = self.state.apply(cmd)  # must never raise
        assert isinstance(result.ok, bool), result
        assert self.replica.apply(wire(command)) == result
        self.log.append((cmd, result))
        self.check_transition(pre, cmd, result, issuer)
        return result

    # -- transition checks --------------------------------------------------

    def check_transition(
        self, pre: MeshState, cmd: Any, result: dict[str, Any], issuer: str | None
    ):
        post = self.state
        if not header_ok(cmd):
            assert result.ok is False
            assert post.to_dict() | {"applied": 0} == pre.to_dict() | {"applied": 0}
            return
        cid = cmd["cid"]
        if cid in pre.seen:
            # a retry of an applied command: the same answer, nothing moves
            assert result == pre.seen[cid][0]
            assert post.to_dict() | {"applied": 0} == pre.to_dict() | {"applied": 0}
            return
        assert post.seen[cid][0] == result
        self.high_water = max(self.high_water, cmd["at_ms"])
        if result.ok is False:
            # a refused command changes nothing (expiry of old keys aside)
            assert runs_view(post) == runs_view(pre), result
            assert peers_view(post) == peers_view(pre), result
            assert (post.tenant_caps, post.default_tenant_cap) == (
                pre.tenant_caps,
                pre.default_tenant_cap,
            )
            assert all(pre.idempotency.get(k) == v for k, v in post.idempotency.items())
        op = cmd.get("op")
        check = (
            {
                c.Op.SUBMIT: self.check_submit,
                c.Op.ASSIGN: self.check_assign,
                c.Op.FINISH: self.check_end,
                c.Op.RELEASE: self.check_end,
                c.Op.PEER_UP: self.check_peer_up,
                c.Op.PEER_DOWN: self.check_peer_down,
                c.Op.CONFIGURE: self.check_configure,
            }.get(op)
            if isinstance(op, str)
            else None
        )
        if check is None:
            # Of the unchecked ops only a wake can be whole by chance (a list
            # of runs): then it wakes none of these garbage ids.
            woke_nothing = isinstance(result, res.Woken) and not result.woken
            assert result.ok is False or woke_nothing, result
            assert runs_view(post) == runs_view(pre), result
        else:
            check(pre, cmd, result, issuer)

    def check_submit(self, pre, cmd, result, issuer):
        post = self.state
        if not result.ok:
            return
        now = cmd["at_ms"]
        specs = list(cmd["runs"])
        entries = result.runs
        assert len(entries) == len(specs)
        created = [e.id for e in entries if e.created]
        new_ids = set(post.runs) - set(pre.runs)
        assert len(created) == len(set(created)) and new_ids == set(created)
        assert set(pre.runs) <= set(post.runs)
        assert not new_ids & self.finished, "a finished run came back"
        for rid, run in pre.runs.items():
            assert post.runs[rid].public() == run.public(), "submit touched an existing run"
        for rid in new_ids:
            run = post.runs[rid]
            assert (run.status, run.owner, run.epoch, run.attempts) == (
                RunStatus.QUEUED,
                None,
                0,
                0,
            )
            assert run.submitted_at_ms == now
        assert set(post.peers) == set(pre.peers)
        for spec, entry in zip(specs, entries, strict=True):
            if entry.rejection is not None:
                continue
            assert isinstance(spec, dict)
            key = spec.get("idempotency_key")
            if entry.created:
                assert entry.id == spec["id"]
                assert post.runs[entry.id].spec.idempotency_key == key
            if key is None:
                assert entry.id == spec["id"]
                continue
            # invariant 5: while a key is remembered, every submit using it
            # gets the same run
            # ("remembered": no command so far carried a time past its expiry;
            # a replayed command carries its old at_ms, so ``now`` is not it)
            # keys are scoped per tenant: another tenant's key is another key
            scoped = (spec.get("tenant") or "default", key)
            known = self.keys.get(scoped)
            if known is not None and known[1] > self.high_water:
                assert entry.id == known[0], f"key {scoped!r}: {known[0]} then {entry.id}"
            if entry.created:
                assert post.idempotency[scoped][0] == entry.id
            if scoped in post.idempotency:
                self.keys[scoped] = post.idempotency[scoped]

    def check_assign(self, pre, cmd, result, issuer):
        post = self.state
        if not result.ok:
            return
        now = cmd["at_ms"]
        by_owner, tenants = recomputed_indexes(pre)
        running = Counter({pid: len(ids) for pid, ids in by_owner.items()})
        tenant_load = Counter(tenants)
        expected: list[str] = []
        for item in cmd["batch"]:
            if not isinstance(item, list) or len(item) != 3:
                continue
            rid, pid, epoch = item
            run = pre.runs.get(rid) if isinstance(rid, str) else None
            peer = pre.peers.get(pid) if isinstance(pid, str) else None
            if (
                run is None
                or rid in expected
                or run.status != RunStatus.QUEUED
                or not isinstance(epoch, int)
                or epoch != run.epoch + 1
                or peer is None
                or peer.status != PEER_UP
                or running[pid] >= peer.slots
                or not labels_fit(peer.labels, run.spec.labels)
            ):
                continue
            cap = cap_of(pre, run.spec.tenant)
            if cap is not None and tenant_load[run.spec.tenant] >= cap:
                continue
            expected.append(rid)
            running[pid] += 1
            tenant_load[run.spec.tenant] += 1
        assert result.accepted == expected, (cmd["batch"], result)

        # invariant 6 at the moment of assignment, from the accepted list alone
        running = Counter({pid: len(ids) for pid, ids in by_owner.items()})
        tenant_load = Counter(tenants)
        for rid in result.accepted:
            run, old = post.runs[rid], pre.runs[rid]
            peer = pre.peers[run.owner]
            running[run.owner] += 1
            tenant_load[run.spec.tenant] += 1
            assert running[run.owner] <= peer.slots, "assign took a peer above its slots"
            cap = cap_of(pre, run.spec.tenant)
            assert cap is None or tenant_load[run.spec.tenant] <= cap, (
                "assign exceeded a tenant cap"
            )
            # invariant 2: epochs move forward by one; the owner is an up peer
            assert old.status == RunStatus.QUEUED and run.status == RunStatus.RUNNING
            assert run.epoch == old.epoch + 1 and run.attempts == old.attempts + 1
            assert peer.status == PEER_UP and labels_fit(peer.labels, run.spec.labels)
            assert run.assigned_at_ms == now
            assert (rid, run.epoch) not in self.assigned, "an epoch was handed out twice"
            self.assigned[(rid, run.epoch)] = (run.owner, peer.incarnation)
        for rid, run in pre.runs.items():
            if rid not in result.accepted:
                assert post.runs[rid].public() == run.public()
        assert set(post.runs) == set(pre.runs)
        assert peers_view(post) == peers_view(pre)

    def check_end(self, pre, cmd, result, issuer):
        """finish and release: only the current owner at the current epoch."""
        post = self.state
        op = cmd["op"]
        rid, epoch = cmd.get("run"), cmd.get("epoch")
        run = pre.runs.get(rid) if isinstance(rid, str) else None
        status = cmd.get("status")
        expect_ok = (
            "epoch" in cmd
            and run is not None
            and run.status == RunStatus.RUNNING
            and run.epoch == epoch
            and (
                op == c.Op.RELEASE
                or ("status" in cmd and isinstance(status, str) and status in TERMINAL_STATUSES)
            )
        )
        if isinstance(rid, str) and rid in self.finished:
            assert not result.ok, "a second finish/release of a finished run was accepted"
        assert result.ok == expect_ok, (cmd, result)
        if not result.ok:
            return
        self.ends.append((op, rid, epoch, issuer, run.owner, run.epoch))
        assert epoch == run.epoch
        assert issuer is None or issuer == run.owner, "a stale owner ended a run"
        assert self.assigned[(rid, run.epoch)][0] == run.owner
        handed = None
        if op == c.Op.FINISH:
            assert rid not in post.runs
            self.finishes[rid] += 1
            assert self.finishes[rid] == 1
            self.finished.add(rid)
            handed = expected_handoff(pre, rid, cmd["at_ms"])
            assert result == (res.Done() if handed is None else res.Finished(handed)), result
        else:
            after = post.runs[rid]
            assert (after.status, after.owner, after.epoch) == (RunStatus.QUEUED, None, run.epoch)
            assert after.attempts == run.attempts
        if handed is not None:
            # the freed slot went to the next run, as an assign of it would have
            old, now = pre.runs[handed], post.runs[handed]
            assert (now.status, now.owner, now.epoch) == (
                RunStatus.RUNNING,
                run.owner,
                old.epoch + 1,
            )
            assert now.attempts == old.attempts + 1 and now.assigned_at_ms == cmd["at_ms"]
            assert (handed, now.epoch) not in self.assigned, "an epoch was handed out twice"
            self.assigned[(handed, now.epoch)] = (run.owner, pre.peers[run.owner].incarnation)
        for other, old in pre.runs.items():
            if other not in (rid, handed):
                assert post.runs[other].public() == old.public()
        assert peers_view(post) == peers_view(pre)

    def check_peer_up(self, pre, cmd, result, issuer):
        post = self.state
        pid, slots, labels = cmd.get("peer"), cmd.get("slots"), cmd.get("labels")
        expect_ok = (
            isinstance(pid, str)
            and isinstance(slots, int)
            and slots >= 0
            and all(k in cmd for k in ("incarnation", "raft", "http"))
            and (not labels or isinstance(labels, dict))
        )
        assert result.ok == expect_ok, (cmd, result)
        if not result.ok:
            return
        peer = post.peers[pid]
        assert (peer.incarnation, peer.status, peer.slots) == (cmd["incarnation"], PEER_UP, slots)
        assert peer.labels == {str(k): str(v) for k, v in (labels or {}).items()}
        known = pre.peers.get(pid)
        restarted = known is not None and known.incarnation != cmd["incarnation"]
        requeued = 0
        for rid, run in pre.runs.items():
            after = post.runs[rid]
            if restarted and run.status == RunStatus.RUNNING and run.owner == pid:
                # the new process has none of the old one's runs
                requeued += 1
                assert (after.status, after.owner, after.epoch) == (
                    RunStatus.QUEUED,
                    None,
                    run.epoch,
                )
            else:
                assert after.public() == run.public()
        assert result.requeued == requeued
        assert set(post.runs) == set(pre.runs)
        for other, old in pre.peers.items():
            if other != pid:
                assert post.peers[other].public() == old.public()

    def check_peer_down(self, pre, cmd, result, issuer):
        post = self.state
        pid = cmd.get("peer")
        peer = pre.peers.get(pid) if isinstance(pid, str) else None
        expect_ok = (
            "incarnation" in cmd and peer is not None and peer.incarnation == cmd["incarnation"]
        )
        assert result.ok == expect_ok, (cmd, result)
        if not result.ok:
            return
        assert post.peers[pid].status == PEER_DOWN
        requeued = 0
        for rid, run in pre.runs.items():
            after = post.runs[rid]
            if run.status == RunStatus.RUNNING and run.owner == pid:
                requeued += 1
                assert (after.status, after.owner, after.epoch) == (
                    RunStatus.QUEUED,
                    None,
                    run.epoch,
                )
            else:
                assert after.public() == run.public()
        assert result.requeued == requeued
        assert set(post.runs) == set(pre.runs)

    def check_configure(self, pre, cmd, result, issuer):
        post = self.state
        caps, default = cmd.get("tenant_caps"), cmd.get("default_tenant_cap")
        expect_ok = (
            "default_tenant_cap" in cmd
            and isinstance(caps, dict)
            and all(isinstance(v, int) and v >= 0 for v in caps.values())
            and (default is None or (isinstance(default, int) and default >= 0))
        )
        assert result.ok == expect_ok, (cmd, result)
        if result.ok:
            assert post.tenant_caps == {str(k): v for k, v in caps.items()}
            assert post.default_tenant_cap == default
            assert runs_view(post) == runs_view(pre) and peers_view(post) == peers_view(pre)

    @initialize(handoff=st.booleans(), aging_ms=st.sampled_from([0, 250]))
    def leader_policy(self, handoff, aging_ms):
        """Most meshes run with the handoff on from the start (the leader's
        first configure); the configure rule turns it on and off later."""
        cmd = c.Configure(self._next("c"), self._at(), {}, None, aging_ms=aging_ms, handoff=handoff)
        assert self.execute(cmd) == res.Done()

    # -- time, leadership, snapshots ------------------------------------------

    @rule(
        delta=st.sampled_from(
            [0, 1, 250, 5_000, 60_000, COMMAND_TTL_MS + 1, IDEMPOTENCY_TTL_MS + 1]
        )
    )
    def advance_clock(self, delta):
        self.clock += delta

    @rule()
    def leadership_changes(self):
        """The leader's current view is kept: it will act on it once deposed."""
        self.old_states = [*self.old_states[-3:], copy.deepcopy(self.state)]
        self.term += 1

    @rule()
    def restore_replica_from_snapshot(self):
        self.replica = snapshot_roundtrip(self.state)

    # -- submissions ----------------------------------------------------------

    def _spec(self, data: st.DataObject, reuse: bool) -> dict[str, Any]:
        active = sorted(self.state.runs)
        if reuse and active:
            rid = data.draw(st.sampled_from(active), label="retried id")
        else:
            rid = self._next("r")
        spec: dict[str, Any] = {
            "id": rid,
            "agent": data.draw(st.sampled_from(["echo", "research"])),
            "input": data.draw(INPUTS),
        }
        key = data.draw(st.none() | st.sampled_from(KEYS), label="key")
        if key is not None:
            spec["idempotency_key"] = key
        tenant = data.draw(st.none() | st.sampled_from(TENANTS), label="tenant")
        if tenant is not None:
            spec["tenant"] = tenant
        labels = data.draw(st.sampled_from(RUN_LABELS), label="labels")
        if labels:
            spec["labels"] = labels
        if data.draw(st.booleans()):
            spec["priority"] = data.draw(st.integers(-2, 2))
        return spec

    @rule(data=st.data(), reuse=st.lists(st.booleans(), min_size=1, max_size=4), skew=SKEW)
    def submit(self, data, reuse, skew):
        specs = [self._spec(data, r) for r in reuse]
        self.execute(c.Submit(self._next("c"), self._at(skew), specs))

    @precondition(lambda self: any(self._resubmittable(cmd) for cmd, _ in self.log))
    @rule(data=st.data(), skew=SKEW)
    def resubmit_with_new_cid(self, data, skew):
        """A proposer that lost track of an earlier submit sends it again."""
        earlier = [
            cmd
            for cmd, _ in self.log
            if self._resubmittable(cmd) and not self._revives_finished(cmd)
        ]
        if earlier:
            cmd = data.draw(st.sampled_from(earlier))
            self.execute(c.Submit(self._next("c"), self._at(skew), cmd["runs"]))

    def _resubmittable(self, cmd: Any) -> bool:
        return header_ok(cmd) and cmd.get("op") == c.Op.SUBMIT and "runs" in cmd

    def _revives_finished(self, cmd: Any) -> bool:
        """Would this submit re-create a finished run id? See the module note."""
        if not isinstance(cmd, dict) or cmd.get("op") != c.Op.SUBMIT:
            return False
        specs = cmd.get("runs")
        return isinstance(specs, list) and any(
            isinstance(s, dict) and isinstance(s.get("id"), str) and s["id"] in self.finished
            for s in specs
        )

    # -- assignment -----------------------------------------------------------

    @rule(data=st.data(), limit=st.integers(1, 6), skew=SKEW)
    def leader_assigns(self, data, limit, skew):
        order = data.draw(st.permutations(sorted(self.state.peers)), label="placement")
        batch = plan_assignments(self.state, order, limit)
        result = self.execute(c.Assign(self._next("c"), self._at(skew), self.term, batch))
        assert result.accepted == [rid for rid, _, _ in batch], "a valid assignment was refused"

    @precondition(lambda self: self.old_states)
    @rule(data=st.data(), limit=st.integers(1, 6), skew=SKEW)
    def deposed_leader_assigns(self, data, limit, skew):
        old = data.draw(st.sampled_from(self.old_states), label="old view")
        order = data.draw(st.permutations(sorted(old.peers)), label="placement")
        batch = plan_assignments(old, order, limit)
        self.execute(c.Assign(self._next("c"), self._at(skew), self.term - 1, batch))

    @rule(data=st.data(), skew=SKEW)
    def garbage_triples(self, data, skew):
        runs = sorted(self.state.runs) + sorted(self.finished)[:3] + ["r-unknown"]
        epochs = st.integers(-1, 6)
        triple = st.tuples(st.sampled_from(runs), st.sampled_from([*PEERS, "p-unknown"]), epochs)
        junk = [list(t) for t in data.draw(st.lists(triple, min_size=1, max_size=5), label="junk")]
        valid = plan_assignments(self.state, sorted(self.state.peers), data.draw(st.integers(0, 3)))
        batch = data.draw(st.permutations(junk + valid), label="batch")
        self.execute(c.Assign(self._next("c"), self._at(skew), self.term, batch))

    # -- ends of runs ---------------------------------------------------------

    def _running(self) -> list[str]:
        return sorted(r.id for r in self.state.runs.values() if r.status == RunStatus.RUNNING)

    @precondition(lambda self: any(r.status == RunStatus.RUNNING for r in self.state.runs.values()))
    @rule(data=st.data(), status=st.sampled_from(STATUSES), skew=SKEW)
    def owner_finishes(self, data, status, skew):
        run = self.state.runs[data.draw(st.sampled_from(self._running()))]
        cmd = c.Finish(self._next("c"), self._at(skew), run.id, run.epoch, status, None)
        assert self.execute(cmd, issuer=run.owner).ok, "check_end says which answer"

    @precondition(lambda self: any(r.status == RunStatus.RUNNING for r in self.state.runs.values()))
    @rule(data=st.data(), skew=SKEW)
    def owner_releases(self, data, skew):
        run = self.state.runs[data.draw(st.sampled_from(self._running()))]
        cmd = c.Release(self._next("c"), self._at(skew), run.id, run.epoch)
        assert self.execute(cmd, issuer=run.owner) == res.Done()

    @precondition(lambda self: self.assigned)
    @rule(data=st.data(), finish=st.booleans(), status=st.sampled_from(STATUSES), skew=SKEW)
    def former_owner_ends(self, data, finish, status, skew):
        """Any peer that ever owned a run, acting on the epoch it was given."""
        rid, epoch = data.draw(st.sampled_from(sorted(self.assigned)), label="held")
        peer = self.assigned[(rid, epoch)][0]
        if finish:
            cmd = c.Finish(self._next("c"), self._at(skew), rid, epoch, status, "late")
        else:
            cmd = c.Release(self._next("c"), self._at(skew), rid, epoch)
        self.execute(cmd, issuer=peer)

    @rule(
        data=st.data(),
        finish=st.booleans(),
        epoch=st.integers(-1, 6),
        status=st.sampled_from([*STATUSES, "running", "queued", "bogus"]),
        skew=SKEW,
    )
    def forged_end(self, data, finish, epoch, status, skew):
        runs = sorted(self.state.runs) + sorted(self.finished)[:3] + ["r-unknown"]
        rid = data.draw(st.sampled_from(runs))
        if finish:
            cmd = c.Finish(self._next("c"), self._at(skew), rid, epoch, status, None)
        else:
            cmd = c.Release(self._next("c"), self._at(skew), rid, epoch)
        self.execute(cmd)

    # -- membership and configuration ------------------------------------------

    @rule(
        peer=st.sampled_from(PEERS),
        slots=st.integers(0, 3),
        labels=st.sampled_from(PEER_LABELS),
        skew=SKEW,
    )
    def peer_starts(self, peer, slots, labels, skew):
        """A (re)started process: always a new incarnation."""
        incarnation = self._next("i")
        self.incarnations.setdefault(peer, []).append(incarnation)
        cmd = c.PeerUp(
            self._next("c"),
            self._at(skew),
            peer,
            incarnation,
            f"{peer}:7000",
            f"http://{peer}",
            slots,
            labels,
        )
        assert self.execute(cmd).ok

    @precondition(lambda self: self.state.peers)
    @rule(data=st.data(), skew=SKEW)
    def peer_reannounces(self, data, skew):
        """The same process announcing itself again (e.g. to a new leader), also
        after a wrong peer_down verdict: same incarnation, same config."""
        peer = self.state.peers[data.draw(st.sampled_from(sorted(self.state.peers)))]
        cmd = c.PeerUp(
            self._next("c"),
            self._at(skew),
            peer.id,
            peer.incarnation,
            peer.raft,
            peer.http,
            peer.slots,
            dict(peer.labels),
        )
        assert self.execute(cmd) == res.Requeued(0)

    @precondition(lambda self: self.state.peers)
    @rule(data=st.data(), right=st.booleans(), skew=SKEW)
    def peer_judged_down(self, data, right, skew):
        peer = self.state.peers[data.draw(st.sampled_from(sorted(self.state.peers)))]
        if right:
            incarnation = peer.incarnation
        else:  # a late verdict on an earlier incarnation, or a confused one
            incarnation = data.draw(
                st.sampled_from([*self.incarnations.get(peer.id, []), "i-never"])
            )
        self.execute(c.PeerDown(self._next("c"), self._at(skew), peer.id, incarnation))

    @rule(
        caps=st.dictionaries(st.sampled_from(TENANTS), st.integers(0, 3), max_size=3),
        default=st.none() | st.integers(0, 3),
        skew=SKEW,
        aging_ms=st.sampled_from([0, 0, 1, 250, 5_000]),
        handoff=st.booleans(),
    )
    def configure(self, caps, default, skew, aging_ms, handoff):
        cmd = c.Configure(self._next("c"), self._at(skew), caps, default)
        cmd = dataclasses.replace(cmd, aging_ms=aging_ms, handoff=handoff)
        assert self.execute(cmd) == res.Done()
        assert (self.state.aging_ms, self.state.handoff) == (aging_ms, handoff)

    # -- retries and garbage ----------------------------------------------------

    @precondition(lambda self: any(header_ok(cmd) for cmd, _ in self.log))
    @rule(data=st.data())
    def replay_applied_command(self, data):
        """The same command (same cid, same at_ms) proposed again. While the
        cid is remembered the first answer comes back and nothing moves."""
        candidates = [
            cmd
            for cmd, _ in self.log
            if header_ok(cmd) and (cmd["cid"] in self.state.seen or not self._revives_finished(cmd))
        ]
        # recent commands are the likely retries; old ones exercise expiry
        cmd = data.draw(st.sampled_from(candidates[-8:]) | st.sampled_from(candidates))
        self.execute(copy.deepcopy(cmd))

    @rule(data=st.data())
    def malformed(self, data):
        kind = data.draw(st.sampled_from(["not a map", "header", "op", "fields", "mutated"]))
        at = self.clock
        if kind == "not a map":
            cmd = data.draw(GARBAGE.filter(lambda v: not isinstance(v, dict)))
        elif kind == "header":
            cmd = {"op": c.Op.SUBMIT, "runs": []}
            cid = data.draw(st.sampled_from(["missing", "wrong"]))
            if cid == "wrong":
                cmd["cid"] = data.draw(NOT_STR)
            else:
                cmd["cid"] = self._next("c")
                if data.draw(st.booleans()):
                    cmd["at_ms"] = data.draw(NOT_INT)
        elif kind == "op":
            op = data.draw(GARBAGE | st.sampled_from([c.Op.SUBMIT.upper(), ""]), label="op")
            cmd = {"op": op, "cid": self._next("c"), "at_ms": at}
            if data.draw(st.booleans()):
                del cmd["op"]
        elif kind == "fields":
            names = [
                "runs",
                "batch",
                "term",
                "run",
                "epoch",
                "status",
                "error",
                "peer",
                "incarnation",
            ]
            names += ["raft", "http", "slots", "labels", "tenant_caps", "default_tenant_cap"]
            fields = data.draw(st.dictionaries(st.sampled_from(names), GARBAGE, max_size=6))
            cmd = {
                **fields,
                "op": data.draw(st.sampled_from(sorted(c.Op))),
                "cid": self._next("c"),
                "at_ms": at,
            }
        else:
            cmd = self._mutated(data, at)
        self.execute(cmd)

    def _mutated(self, data: st.DataObject, at: int) -> dict[str, Any]:
        """A well-formed command with one part broken."""
        op = data.draw(st.sampled_from(sorted(c.Op)), label="mutated op")
        cid = self._next("c")
        if op == c.Op.SUBMIT:
            good = [self._spec(data, False) for _ in range(data.draw(st.integers(0, 2)))]
            bad = self._spec(data, False)
            how = data.draw(
                st.sampled_from(["no id", "id", "no agent", "key", "labels", "typed", "spec"])
            )
            if how == "no id":
                del bad["id"]
            elif how == "id":
                bad["id"] = data.draw(NOT_STR)
            elif how == "no agent":
                del bad["agent"]
            elif how == "key":
                bad["idempotency_key"] = data.draw(st.lists(SMALL_INTS, min_size=1, max_size=2))
            elif how == "labels":
                bad["labels"] = data.draw(st.lists(SMALL_INTS, min_size=1, max_size=2))
            elif how == "typed":
                bad[data.draw(st.sampled_from(["agent", "tenant", "priority", "max_attempts"]))] = (
                    "x" if (data.draw(st.booleans())) else [1]
                )
            else:
                bad = data.draw(GARBAGE.filter(lambda v: not isinstance(v, dict)))
            specs = data.draw(st.permutations([*good, bad]))
            return c.Submit(cid, at, specs)
        if op == c.Op.ASSIGN:
            valid = plan_assignments(
                self.state, sorted(self.state.peers), data.draw(st.integers(0, 3))
            )
            runs = sorted(self.state.runs) or ["r-unknown"]
            bad = data.draw(
                st.sampled_from(["short", "long", "scalar", "run type", "peer type", "epoch type"])
            )
            rid = data.draw(st.sampled_from(runs))
            item: Any = {
                "short": [rid, "p0"],
                "long": [rid, "p0", 1, 2],
                "scalar": data.draw(GARBAGE.filter(lambda v: not isinstance(v, list))),
                "run type": [[rid], "p0", 1],
                "peer type": [rid, {"p": 0}, 1],
                "epoch type": [rid, "p0", data.draw(NOT_INT)],
            }[bad]
            batch = data.draw(st.permutations([*valid, item]))
            # (built by hand: commands.Assign would turn the broken item into a list)
            return {"op": c.Op.ASSIGN, "cid": cid, "at_ms": at, "term": self.term, "batch": batch}
        if op == c.Op.PEER_UP:
            # a restart (new incarnation) whose announcement is broken
            peer = data.draw(st.sampled_from(PEERS))
            incarnation = self._next("i")
            self.incarnations.setdefault(peer, []).append(incarnation)
            cmd = c.PeerUp(
                cid, at, peer, incarnation, f"{peer}:7000", f"http://{peer}", 2, {}
            ).to_wire()
            field = data.draw(st.sampled_from(["raft", "http", "slots", "labels", "peer"]))
            if field == "labels":
                cmd["labels"] = data.draw(
                    st.lists(SMALL_INTS, min_size=1, max_size=2) | st.just("gpu")
                )
            elif field == "slots" and data.draw(st.booleans()):
                cmd["slots"] = data.draw(st.integers(-3, -1) | NOT_INT)
            elif field == "peer":
                cmd["peer"] = data.draw(NOT_STR)
            else:
                del cmd[field]
            return cmd
        if op in (c.Op.FINISH, c.Op.RELEASE):
            running = self._running() or ["r-unknown"]
            rid = data.draw(st.sampled_from(running))
            epoch = self.state.runs[rid].epoch if rid in self.state.runs else 1
            cmd = c.Finish(cid, at, rid, epoch, "succeeded", None).to_wire()
            if op == c.Op.RELEASE:
                cmd = c.Release(cid, at, rid, epoch).to_wire()
            field = data.draw(st.sampled_from(["run", "epoch", "status"]))
            if field == "run" and data.draw(st.booleans()):
                cmd["run"] = data.draw(st.lists(st.just(rid), min_size=1, max_size=1) | NOT_STR)
            elif field == "status":
                cmd["status"] = data.draw(GARBAGE)
            else:
                cmd.pop(field, None)
            return cmd
        if op == c.Op.PEER_DOWN:
            peer = self.state.peers.get(data.draw(st.sampled_from(PEERS)))
            cmd = c.PeerDown(
                cid, at, peer.id if peer else "p0", peer.incarnation if peer else "i-never"
            ).to_wire()
            if data.draw(st.booleans()):
                cmd["peer"] = data.draw(st.lists(st.sampled_from(PEERS), min_size=1, max_size=1))
            else:
                del cmd[data.draw(st.sampled_from(["peer", "incarnation"]))]
            return cmd
        cmd = c.Configure(cid, at, {"t0": 1}, None).to_wire()
        broken = data.draw(st.sampled_from(["caps", "cap value", "default", "missing"]))
        if broken == "caps":
            cmd["tenant_caps"] = data.draw(GARBAGE.filter(lambda v: not isinstance(v, dict)))
        elif broken == "cap value":
            cmd["tenant_caps"] = {"t0": data.draw(st.integers(-(2**63), -1) | NOT_INT)}
        elif broken == "default":
            cmd["default_tenant_cap"] = data.draw(st.integers(-(2**63), -1) | st.text(max_size=2))
        else:
            del cmd[data.draw(st.sampled_from(["tenant_caps", "default_tenant_cap"]))]
        return cmd

    # -- invariants -------------------------------------------------------------

    @invariant()
    def indexes_match_runs(self):
        by_owner, tenants = recomputed_indexes(self.state)
        assert {pid: ids for pid, ids in self.state.by_owner.items() if ids} == by_owner
        assert self.state.tenant_running == tenants
        for pid in self.state.peers:
            assert self.state.running_on(pid) == len(by_owner.get(pid, ()))
        runs = self.state.runs.values()
        queued = sorted(
            (r for r in runs if r.status == RunStatus.QUEUED),
            key=lambda r: (-r.spec.priority, r.submitted_at_ms, r.id),
        )
        assert [r.id for r in self.state.queued()] == [r.id for r in queued]
        assert self.state.tenant_queued == dict(Counter(r.spec.tenant for r in queued))
        assert self.state.waiting_ids == {r.id for r in runs if r.status == RunStatus.WAITING}
        assert self.state.settling_ids == {r.id for r in runs if r.status == RunStatus.SETTLING}

    @invariant()
    def no_peer_above_its_slots(self):
        by_owner, _ = recomputed_indexes(self.state)
        for pid, ids in by_owner.items():
            peer = self.state.peers.get(pid)
            assert peer is not None and peer.status == PEER_UP, f"{pid} owns runs but is not up"
            assert len(ids) <= peer.slots, f"{pid} runs {len(ids)} > {peer.slots} slots"

    @invariant()
    def ownership_and_epochs(self):
        for run in self.state.runs.values():
            assert run.id not in self.finished, "a finished run is back in state"
            assert run.epoch >= self.last_epoch.get(run.id, 0), "an epoch went backwards"
            self.last_epoch[run.id] = run.epoch
            if run.status == RunStatus.RUNNING:
                # owned by the very incarnation it was assigned to
                peer = self.state.peers[run.owner]
                assert self.assigned[(run.id, run.epoch)] == (run.owner, peer.incarnation)
            else:
                assert run.status == RunStatus.QUEUED and run.owner is None
        for _op, rid, epoch, issuer, owner, current in self.ends:
            assert epoch == current and (issuer is None or issuer == owner), (rid, epoch)
        assert all(n == 1 for n in self.finishes.values())

    @invariant()
    def remembered_keys_point_at_real_runs(self):
        for key, (rid, _expires) in self.state.idempotency.items():
            assert rid in self.state.runs or rid in self.finished, (key, rid)

    @invariant()
    def snapshot_round_trips_and_replica_agrees(self):
        snapshot = self.state.to_dict()
        assert snapshot_roundtrip(self.state).to_dict() == snapshot
        assert self.replica.to_dict() == snapshot

    def teardown(self):
        # determinism: the same log on a fresh state gives the same answers
        fresh = MeshState()
        assert [fresh.apply(wire(cmd)) for cmd, _ in self.log] == [r for _, r in self.log]
        assert fresh.to_dict() == self.state.to_dict()


MeshMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestMeshStateMachine = MeshMachine.TestCase


# -- stateless properties ---------------------------------------------------------


def _command_strategy() -> st.SearchStrategy[Any]:
    cid = st.sampled_from(["c1", "c2", "c3", "c4", "c5", "c6"])
    at = st.integers(0, 3 * COMMAND_TTL_MS)
    rid = st.sampled_from(["r1", "r2", "r3"])
    peer = st.sampled_from(["p1", "p2"])
    inc = st.sampled_from(["i1", "i2"])
    spec = st.fixed_dictionaries(
        {"id": rid, "agent": st.just("echo")},
        optional={
            "idempotency_key": st.sampled_from(["k1", "k2"]),
            "tenant": st.sampled_from(TENANTS),
            "labels": st.sampled_from(RUN_LABELS),
        },
    )
    triple = st.tuples(rid, peer, st.integers(0, 3)).map(list)
    return st.one_of(
        st.builds(c.Submit, cid, at, st.lists(spec, max_size=3)),
        st.builds(c.Assign, cid, at, st.integers(0, 3), st.lists(triple, max_size=3)),
        st.builds(c.Finish, cid, at, rid, st.integers(0, 3), st.sampled_from(STATUSES), st.none()),
        st.builds(c.Release, cid, at, rid, st.integers(0, 3)),
        st.builds(
            c.PeerUp,
            cid,
            at,
            peer,
            inc,
            st.just("r"),
            st.just("h"),
            st.integers(0, 2),
            st.sampled_from(PEER_LABELS),
        ),
        st.builds(c.PeerDown, cid, at, peer, inc),
        st.builds(
            c.Configure,
            cid,
            at,
            st.dictionaries(st.sampled_from(TENANTS), st.integers(0, 2)),
            st.none() | st.integers(0, 2),
        ),
        GARBAGE,
        st.fixed_dictionaries(
            {"op": GARBAGE | st.sampled_from(sorted(c.Op)), "cid": cid, "at_ms": at}
        ),
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(_command_strategy(), max_size=30))
def test_apply_is_total_and_deterministic(commands):
    """Any sequence of (wire-form) commands: apply never raises, two fresh
    states agree on every result and on the final state, and the final state
    survives a snapshot round trip."""
    one, two = MeshState(), MeshState()
    for command in commands:
        first = one.apply(wire(command))
        assert isinstance(first.ok, bool)
        assert two.apply(wire(command)) == first
    assert one.to_dict() == two.to_dict()
    assert snapshot_roundtrip(one).to_dict() == one.to_dict()
