"""One chaos run, start to verdict.

Peers run as separate processes (DevMesh). Every Raft and HTTP link between
two peers, and every peer's link to PostgreSQL, goes through a harness proxy
(chaos.proxy), so partitions and database outages need no root and never
touch the machine's shared database service. The workload submits through
random peers while the nemesis inflicts the seeded schedule; afterwards every
fault is healed, the mesh drains, and the checker judges the history, the
side-effect ledger and storage (read directly, not through the proxy).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp

from raftmesh.chaos.checker import Verdict, check
from raftmesh.chaos.history import (
    Delivery,
    History,
    StorageSnapshot,
    StoredRun,
    StoredSignal,
    StoredWrite,
)
from raftmesh.chaos.ledger import LEDGER_DIR_ENV, read_ledger
from raftmesh.chaos.nemesis import ALL_KINDS, DB, Nemesis, now_ms, plan
from raftmesh.chaos.pgcluster import PrivatePostgres
from raftmesh.chaos.proxy import Proxies
from raftmesh.chaos.report import CHAOS_EXTRA_HINT, text_report, timeline_png
from raftmesh.chaos.secure import make_secure_setup
from raftmesh.chaos.workload import TENANT_CAPS, Workload, WorkloadSpec, canonical
from raftmesh.mesh.client import MeshClient, MeshHTTPError
from raftmesh.mesh.devmesh import DevMesh
from raftmesh.mesh.settings import UNSAFE_FENCING_ACK, UNSAFE_FENCING_ACK_ENV
from raftmesh.runner.payload import unpack
from raftmesh.storage import open_store
from raftmesh.storage.base import Step

log = logging.getLogger("chaos")


# --storage private: a PostgreSQL server of the run's own, which the db fault
# may really restart (chaos.pgcluster).
PRIVATE = "private"


class ChaosError(RuntimeError):
    """The run could not be set up as asked."""


@dataclass(frozen=True)
class ChaosConfig:
    out: Path
    storage: str
    seed: int = 1
    peers: int = 5
    duration_s: float = 120.0
    faults: tuple[str, ...] = ALL_KINDS
    slots: int = 4
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    drain_s: float = 60.0
    failover_bound_s: float = 10.0
    keep_schema: bool = False
    # UNSAFE: peers run with fencing off. Only for showing the checker works.
    unsafe_disable_fencing: bool = False
    # The security settings on: peers serve https from a made-up CA and take
    # tokens from a tokens file; the workload and the nemesis use the admin
    # token (the workload submits for several tenants) and check the CA.
    secure: bool = False
    # Peers suspend waits this long or longer (MESH_SUSPEND_AFTER_S): short,
    # so the workload's sleepers, signal waits and parents really leave their
    # slots, and faults hit runs that are waiting, suspending and waking.
    suspend_after_s: float = 1.0

    def __post_init__(self) -> None:
        unknown = set(self.faults) - set(ALL_KINDS)
        if unknown:
            raise ChaosError(
                f"unknown fault kinds {sorted(unknown)}; choose from {', '.join(ALL_KINDS)}"
            )
        if not 0 <= self.suspend_after_s < 1e9:
            raise ChaosError("suspend_after_s must be a number of seconds >= 0")
        if self.peers < 3:
            raise ChaosError("a chaos run needs at least 3 peers, so a minority can fail")
        if DB in self.faults and not (_is_postgres(self.storage) or self.storage == PRIVATE):
            raise ChaosError("the db fault needs PostgreSQL storage (a proxy sits in front of it)")


@dataclass
class Outcome:
    verdict: Verdict
    report: str
    out: Path
    nemesis_errors: list[str] = field(default_factory=list)
    timeline: Path | None = None

    @property
    def exit_code(self) -> int:
        """1: an invariant was violated; 3: a planned fault could not be
        inflicted, so a pass would not mean what it says."""
        if not self.verdict.passed:
            return 1
        return 3 if self.nemesis_errors else 0


def _is_postgres(url: str) -> bool:
    return url.split("://", 1)[0].lower() in ("postgresql", "postgres")


def _with_schema(url: str, schema: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "schema"] + [("schema", schema)]
    return urlunsplit(parts._replace(query=urlencode(query)))


def _via(url: str, addr: str) -> str:
    """The same PostgreSQL URL, but reaching the server at ``addr`` (the proxy)."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{addr}" if userinfo else addr
    return urlunsplit(parts._replace(netloc=netloc))


def _absolute_sqlite(url: str) -> str:
    """Peers run in their own directories: a relative SQLite path must not move."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/"):
        return prefix + str(Path(url[len(prefix) :]).resolve())
    return url


def _pg_addr(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname or '127.0.0.1'}:{parts.port or 5432}"


async def proxied_mesh(
    dir: Path, peers: int, storage: str, slots: int, env: dict[str, str]
) -> tuple[DevMesh, Proxies]:
    """A DevMesh (not started) whose every peer-to-peer Raft and HTTP link, and
    every link to PostgreSQL, runs through a proxy of the returned Proxies.

    Links are named ``raft:A->B`` and ``http:A->B`` (A dials B) and ``db``.
    Peers keep announcing their real addresses; ``MESH_DIAL`` only changes
    where they connect, which is what pysyncobj's handshake needs (see
    consensus.raft._DialNode).
    """
    proxies = Proxies()
    peer_storage = storage
    if _is_postgres(storage):
        db_link = await proxies.add("db", _pg_addr(storage))
        peer_storage = _via(storage, db_link.listen)
    mesh = DevMesh(dir, peers, storage=peer_storage, base_port=0, slots=slots, env=env)
    for src in mesh.peers:
        dial = []
        for dst in mesh.peers:
            if dst is src:
                continue
            raft = await proxies.add(f"raft:{src.id}->{dst.id}", dst.raft)
            http = await proxies.add(f"http:{src.id}->{dst.id}", dst.http)
            dial += [f"{dst.raft}={raft.listen}", f"{dst.http}={http.listen}"]
        mesh.set_peer_env(src.id, {"MESH_DIAL": ",".join(dial)})
    return mesh, proxies


class MeshControl:
    """The nemesis's handle on the mesh and the proxies."""

    def __init__(
        self,
        mesh: DevMesh,
        proxies: Proxies,
        pg: PrivatePostgres | None = None,
        token: str | None = None,
    ) -> None:
        self.mesh = mesh
        self.proxies = proxies
        self.pg = pg
        self.peer_ids = [p.id for p in mesh.peers]
        # Told (left, joined, url) when a member fault replaces a peer.
        self.on_join: Callable[[str, str, str], None] | None = None
        self._paused: set[str] = set()
        self._token = token
        self._clients = {p.id: self._client(p.url, 1.5) for p in mesh.peers}

    def _client(self, url: str, timeout_s: float) -> MeshClient:
        return MeshClient(url, self._token, timeout_s=timeout_s, ca=self.mesh.ca)

    def kill(self, peer_id: str, sig: int) -> None:
        if not self.mesh.peer(peer_id).running:
            return
        if sig == signal.SIGKILL:
            self.mesh.kill(peer_id, sig)
            self._paused.discard(peer_id)
            return
        self.mesh.kill(peer_id, sig)
        if sig == signal.SIGSTOP:
            self._paused.add(peer_id)
        elif sig == signal.SIGCONT:
            self._paused.discard(peer_id)

    def start(self, peer_id: str) -> None:
        if not self.mesh.peer(peer_id).running:
            self.mesh.restart(peer_id)

    def running(self, peer_id: str) -> bool:
        return self.mesh.peer(peer_id).running

    async def leader(self) -> str | None:
        for peer_id in self.peer_ids:
            if peer_id in self._paused or not self.running(peer_id):
                continue
            try:
                leader = (await self._clients[peer_id].cluster()).get("leader")
            except (MeshHTTPError, aiohttp.ClientError, OSError, TimeoutError):
                continue
            if leader:
                return str(leader)
        return None

    def cut(self, src: str, dst: str, state: str) -> None:
        names = [f"raft:{src}->{dst}", f"http:{src}->{dst}"]
        self.proxies.set([n for n in names if n in self.proxies.links], state)

    def db(self, state: str) -> None:
        if "db" in self.proxies.links:
            self.proxies.set(["db"], state)

    @property
    def can_restart_db(self) -> bool:
        return self.pg is not None

    async def restart_db(self, down_s: float) -> None:
        """Crash the private server (immediate stop), keep it down, start it again."""
        assert self.pg is not None
        await asyncio.to_thread(self.pg.stop, "immediate")
        await asyncio.sleep(down_s)
        await asyncio.to_thread(self.pg.start)

    async def leave(self, peer_id: str) -> None:
        """``mesh leave`` through the peer itself: its runs are handed back at
        their next step, it leaves the voters and its process exits."""
        peer = self.mesh.peer(peer_id)
        async with self._client(peer.url, 90) as client:
            await client.leave(peer_id, release=True)
        assert peer.process is not None
        await asyncio.to_thread(peer.process.wait, 30)

    async def join(self, replacing: str) -> str:
        """``mesh join`` a fresh voter (a peer that left cannot come back with
        its old data dir) and let faults target it instead of ``replacing``.

        The newcomer dials the others through new proxy links; the others
        reach it directly (their MESH_DIAL was fixed when they started), so a
        later partition cuts only its own side of those links.
        """
        seed = next(
            p for p in self.peer_ids if p != replacing and self.running(p) and p not in self._paused
        )
        new_id = f"peer-{len(self.mesh.peers) + 1}"
        dial = []
        for dst in self.mesh.peers:
            if dst.id == replacing:
                continue
            raft = await self.proxies.add(f"raft:{new_id}->{dst.id}", dst.raft)
            http = await self.proxies.add(f"http:{new_id}->{dst.id}", dst.http)
            dial += [f"{dst.raft}={raft.listen}", f"{dst.http}={http.listen}"]
        self.mesh.set_peer_env(new_id, {"MESH_DIAL": ",".join(dial)})
        peer = self.mesh.join(seed, peer_id=new_id)
        await self.mesh.wait_ready(timeout_s=60, peer_ids=[new_id])
        self.peer_ids[self.peer_ids.index(replacing)] = new_id
        self._clients[new_id] = self._client(peer.url, 1.5)
        if self.on_join is not None:
            self.on_join(replacing, new_id, peer.url)
        return new_id

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._clients.values()))


async def run(config: ChaosConfig) -> Outcome:
    out = config.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    ledger_dir = out / "ledger"
    if ledger_dir.exists():
        shutil.rmtree(ledger_dir)
    ledger_dir.mkdir()
    tag = f"chaos{config.seed}-{uuid.uuid4().hex[:6]}"
    storage = config.storage
    pg: PrivatePostgres | None = None
    if storage == PRIVATE:
        # Not under ``out``: the postgres user must reach it, and test
        # directories are private to their owner.
        pg = PrivatePostgres(Path(tempfile.mkdtemp(prefix="raftmesh-chaos-pg-")))
        await asyncio.to_thread(pg.create)
        await asyncio.to_thread(pg.start)
        storage = pg.url
    created_schema: str | None = None
    if _is_postgres(storage) and "schema=" not in storage:
        created_schema = tag.replace("-", "_")
        storage = _with_schema(storage, created_schema)
    storage = _absolute_sqlite(storage)

    env = {
        "MESH_AGENT_MODULES": "raftmesh.chaos.agents",
        LEDGER_DIR_ENV: str(ledger_dir),
        "MESH_LOG_LEVEL": "info",
        "MESH_TENANT_CAPS": TENANT_CAPS,
        "MESH_SUSPEND_AFTER_S": f"{config.suspend_after_s:g}",
    }
    if config.unsafe_disable_fencing:
        env["MESH_UNSAFE_DISABLE_FENCING"] = "true"
        env[UNSAFE_FENCING_ACK_ENV] = UNSAFE_FENCING_ACK
    token: str | None = None
    if config.secure:
        setup = make_secure_setup(out / "secure")
        env.update(setup.peer_env())
        token = setup.admin_token
        # A peer the member fault joins asks the seed with this admin token.
        env["MESH_API_TOKEN_FILE"] = str(setup.admin_token_file)
    mesh, proxies = await proxied_mesh(out / "mesh", config.peers, storage, config.slots, env)

    history = History()
    cluster = MeshControl(mesh, proxies, pg, token)
    schedule = plan(config.seed, config.duration_s, config.peers, config.faults)
    (out / "schedule.json").write_text(json.dumps([asdict(f) for f in schedule], indent=1))
    workload = Workload(
        {p.id: p.url for p in mesh.peers},
        config.workload,
        config.seed,
        tag,
        history,
        token=token,
        ca=mesh.ca,
    )
    cluster.on_join = workload.replace_peer
    nemesis = Nemesis(cluster, schedule)
    nemesis_task: asyncio.Task[None] | None = None
    try:
        mesh.start()
        await mesh.wait_ready(timeout_s=90)
        history.start_ms = now_ms()
        await workload.create_schedule()
        started = time.monotonic()
        log.info(
            "chaos run %s: %d faults planned over %.0f s", tag, len(schedule), config.duration_s
        )
        tasks = [
            asyncio.create_task(workload.submit_loop(i)) for i in range(config.workload.clients)
        ]
        helpers = [
            asyncio.create_task(workload.watch_loop()),
            asyncio.create_task(workload.sample_loop()),
            asyncio.create_task(workload.pause_loop()),
        ]
        nemesis_task = asyncio.create_task(nemesis.run(started))
        await asyncio.sleep(config.duration_s)
        await _cancel(nemesis_task)
        await nemesis.heal()
        workload.stop()
        await asyncio.gather(*tasks, *helpers)
        await workload.delete_schedules()
        await _drain(workload, config.drain_s)
        await workload.stop_signallers()
        history.end_ms = now_ms()
        await _final_reads(workload)
        snapshot = await read_storage(storage)
    finally:
        # On an abort too: a nemesis still running could start peers again.
        if nemesis_task is not None:
            await _cancel(nemesis_task)
        await cluster.close()
        await workload.close()
        mesh.stop(grace_s=5)
        await proxies.close()
        if pg is not None:
            with contextlib.suppress(OSError):
                shutil.copy(pg.log, out / "postgres.log")
            await asyncio.to_thread(pg.destroy)
        elif created_schema is not None and not config.keep_schema:
            await _drop_schema(config.storage, created_schema)
    history.faults = nemesis.faults
    history.save(out / "history.jsonl")
    save_snapshot(snapshot, out / "storage.json")
    ledger = read_ledger(ledger_dir)
    verdict = check(
        history, ledger, snapshot, failover_bound_ms=int(config.failover_bound_s * 1000)
    )
    header = [
        f"seed {config.seed}, {config.peers} peers, {config.duration_s:g} s,"
        f" faults {','.join(config.faults)}, {config.slots} slots per peer,"
        f" waits of {config.suspend_after_s:g} s or more suspend",
        f"storage {storage.rpartition('@')[2]}"
        + (" (a private server the db fault may restart)" if pg else "")
        + (
            " (schema dropped afterwards)"
            if created_schema and not config.keep_schema and not pg
            else ""
        ),
        "fencing: " + ("DISABLED (unsafe debug mode)" if config.unsafe_disable_fencing else "on"),
        "security: "
        + ("tokens file and TLS (https, CA-verified)" if config.secure else "off (plain http)"),
        f"replay: python -m raftmesh.chaos run --peers {config.peers} --duration {config.duration_s:g}"
        f" --faults {','.join(config.faults)} --seed {config.seed}"
        f" --suspend-after {config.suspend_after_s:g} --storage URL --out DIR"
        + (" --secure" if config.secure else ""),
        f"ledger entries {len(ledger)}; peer logs in {mesh.dir}",
        *(f"NEMESIS ERROR: {e}" for e in nemesis.errors),
    ]
    report = text_report(verdict, history, snapshot, header)
    (out / "report.txt").write_text(report)
    (out / "verdict.json").write_text(
        json.dumps(
            {
                "passed": verdict.passed,
                "invariants": [
                    {
                        "number": i.number,
                        "name": i.name,
                        "passed": i.passed,
                        "checked": i.checked,
                        "violations": i.violations,
                    }
                    for i in verdict.invariants
                ],
                "failover_ms": verdict.failover_percentiles(),
                "outages_ms": [w.duration_ms for w in verdict.outages],
                "acknowledged": verdict.acknowledged,
                "completed": verdict.completed,
                "waits": asdict(verdict.waits),
                "faults": [f.kind for f in history.faults],
            },
            indent=1,
        )
    )
    # Last: the report and the verdict are on disk whatever happens here.
    timeline = out / "timeline.png"
    if not timeline_png(verdict, history, snapshot, timeline):
        log.warning(CHAOS_EXTRA_HINT)
    return Outcome(verdict, report, out, nemesis.errors, timeline if timeline.exists() else None)


async def _cancel(task: asyncio.Task[None]) -> None:
    if not task.done():
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _drain(workload: Workload, drain_s: float) -> None:
    """After healing, let every acknowledged run finish (or the time run out)."""
    rng = random.Random(0)
    deadline = time.monotonic() + drain_s
    while time.monotonic() < deadline:
        await workload.resume_paused()
        if await workload.observe_pending(rng) == 0:
            return
        await asyncio.sleep(0.5)


async def _final_reads(workload: Workload) -> None:
    """One more read of every acknowledged run, so a changed outcome shows."""
    peers = sorted(workload.urls)
    sem = asyncio.Semaphore(16)

    async def one(i: int, run_id: str) -> None:
        async with sem:
            await workload.observe(run_id, peers[i % len(peers)])

    await asyncio.gather(*(one(i, r) for i, r in enumerate(sorted(set(workload.acked.values())))))


async def read_storage(url: str) -> StorageSnapshot:
    store = open_store(url)
    await store.open()
    snapshot = StorageSnapshot()
    try:
        for row in await store.list_runs(None, limit=1_000_000):
            result = unpack(row.result) if row.result is not None else None
            epoch = result.get("epoch") if isinstance(result, dict) else None
            snapshot.runs[row.id] = StoredRun(
                id=row.id,
                status=row.status,
                epoch=row.epoch,
                owner=row.owner,
                idempotency_key=row.spec.idempotency_key,
                result=canonical(result),
                result_epoch=epoch if isinstance(epoch, int) else None,
                finished_at_ms=row.finished_at_ms,
                error=row.error,
                agent=row.spec.agent,
                parent_id=row.spec.parent_id,
            )
            consumed: dict[str, int] = {}
            for step in sorted(await store.load_steps(row.id), key=lambda s: s.seq):
                snapshot.steps.append(
                    StoredWrite(row.id, step.seq, step.epoch, step.at_ms, step.peer)
                )
                if step.name.startswith(SIGNAL_STEP):
                    snapshot.deliveries.append(
                        _delivery(row.id, step.name[len(SIGNAL_STEP) :], step, consumed)
                    )
            for sig in await store.list_signals(row.id):
                snapshot.signals.append(
                    StoredSignal(
                        row.id, sig.name, sig.seq, sig.idempotency_key, _json(unpack(sig.data))
                    )
                )
            for ev in await store.read_events(row.id, 0, 100_000):
                snapshot.events.append(StoredWrite(row.id, ev.seq, ev.epoch, ev.at_ms))
    finally:
        await store.close()
    return snapshot


# The journal name of a ``wait_for_signal`` (runner.context), then the signal's name.
SIGNAL_STEP = "signal:"


def _delivery(run_id: str, name: str, step: Step, consumed: dict[str, int]) -> Delivery:
    """A journaled wait: the signal it consumed (the next of its name: a wait
    that timed out consumed none) or its timeout."""
    value = unpack(step.value)
    index = consumed.get(name, 0)
    if isinstance(value, dict) and "data" in value:
        consumed[name] = index + 1
        return Delivery(run_id, name, index, step.seq, _json(value["data"]))
    return Delivery(run_id, name, index, step.seq, None)


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def save_snapshot(snapshot: StorageSnapshot, path: Path) -> None:
    path.write_text(
        json.dumps(
            {
                "runs": [asdict(r) for r in snapshot.runs.values()],
                "steps": [asdict(w) for w in snapshot.steps],
                "events": [asdict(w) for w in snapshot.events],
                "signals": [asdict(w) for w in snapshot.signals],
                "deliveries": [asdict(w) for w in snapshot.deliveries],
            }
        )
    )


def load_snapshot(path: Path) -> StorageSnapshot:
    data: dict[str, Any] = json.loads(path.read_text())
    return StorageSnapshot(
        runs={r["id"]: StoredRun(**r) for r in data["runs"]},
        steps=[StoredWrite(**w) for w in data["steps"]],
        events=[StoredWrite(**w) for w in data["events"]],
        signals=[StoredSignal(**w) for w in data.get("signals", [])],
        deliveries=[Delivery(**w) for w in data.get("deliveries", [])],
    )


async def _drop_schema(url: str, schema: str) -> None:
    import asyncpg

    parts = urlsplit(url)
    dsn = urlunsplit(parts._replace(query=urlencode([(k, v) for k, v in parse_qsl(parts.query)])))
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def recheck(out: Path, failover_bound_s: float = 10.0) -> Outcome:
    """Judge a finished run's saved history, ledger and storage again."""
    history = History.load(out / "history.jsonl")
    snapshot = load_snapshot(out / "storage.json")
    verdict = check(
        history,
        read_ledger(out / "ledger"),
        snapshot,
        failover_bound_ms=int(failover_bound_s * 1000),
    )
    report = text_report(verdict, history, snapshot, [f"re-checked from {out}"])
    return Outcome(verdict, report, out)
