"""LangGraph on the mesh: a checkpointer in raftmesh storage, and the ``langgraph`` agent.

``MeshCheckpointSaver`` keeps a graph's checkpoints in the tables of migration
0003, beside the runs (storage/graph_checkpoints.py). Used inside a run
(``MeshCheckpointSaver.for_run(ctx)``) it is bound to the run's epoch: every
checkpoint write is refused in the same transaction that checks runs.epoch,
so a deposed owner can no more write a checkpoint than a step.

The ``langgraph`` built-in agent runs a compiled graph named by reference with
thread_id = the run id. A resumed attempt continues from the last checkpoint
(LangGraph skips the nodes that finished, and reuses the pending writes of
those that finished in an unfinished super-step), so no finished node runs
again. A graph that stops at ``interrupt()`` says so in an ``interrupt``
event and waits for the run's next ``resume`` signal without a slot
(``ctx.wait_for_signal``); the graph then continues from its checkpoint with
``Command(resume=data)``, on whichever peer the run lands.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from raftmesh.runner.integrations import ExtraMissing, resolve

try:
    from langgraph.checkpoint.base import (
        WRITES_IDX_MAP,
        BaseCheckpointSaver,
        ChannelVersions,
        Checkpoint,
        CheckpointMetadata,
        CheckpointTuple,
        get_checkpoint_id,
        get_checkpoint_metadata,
    )
    from langgraph.graph import StateGraph
    from langgraph.pregel import Pregel
    from langgraph.types import Command, Interrupt, StreamMode
except ImportError as exc:
    raise ExtraMissing("langgraph", "langgraph") from exc

from langchain_core.runnables import RunnableConfig

from raftmesh.runner.agents.chat import model_capacity
from raftmesh.runner.context import Fenced, RunContext, RunError
from raftmesh.runner.integrations.inputs import check_graph_input
from raftmesh.runner.models import DEFAULT_MODEL
from raftmesh.runner.registry import agent
from raftmesh.storage import StaleEpoch, open_store
from raftmesh.storage.graph_checkpoints import (
    BlobRow,
    CheckpointRow,
    Fence,
    GraphCheckpoints,
    WriteRow,
)

__all__ = ["MeshCheckpointSaver", "run_graph"]


class MeshCheckpointSaver(BaseCheckpointSaver[str]):
    """A LangGraph checkpointer whose state lives in raftmesh storage.

    Async first; the sync methods hand their work to the event loop the saver
    was made on, so they may be called from any other thread (LangGraph's sync
    ``invoke`` in a worker thread) but never from that loop's own thread.
    """

    def __init__(self, tables: GraphCheckpoints, *, fenced: Fence | None = None) -> None:
        super().__init__()
        self._tables = tables
        self._fenced = fenced
        self._loop = asyncio.get_running_loop()

    @classmethod
    @asynccontextmanager
    async def open(cls, storage_url: str) -> AsyncIterator[MeshCheckpointSaver]:
        """A saver on the storage ``storage_url`` names (the peers' storage URL),
        its tables migrated; the storage is closed on exit."""
        store = open_store(storage_url)
        await store.open()
        try:
            yield cls(GraphCheckpoints(store))
        finally:
            await store.close()

    @classmethod
    def for_run(cls, ctx: RunContext) -> MeshCheckpointSaver:
        """A saver on the run's storage whose writes are fenced by the run's epoch."""
        return cls(GraphCheckpoints(ctx.store), fenced=Fence(ctx.run_id, ctx.epoch))

    # -- async interface ----------------------------------------------------

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        conf = config["configurable"]
        row = await self._tables.get_checkpoint(
            conf["thread_id"], conf.get("checkpoint_ns", ""), get_checkpoint_id(config)
        )
        return (
            None
            if row is None
            else await self._tuple(row, self._loads(row.metadata_type, row.metadata))
        )

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        if limit is not None and limit <= 0:
            return
        conf = config["configurable"] if config else {}
        rows = await self._tables.list_checkpoints(
            conf.get("thread_id"),
            conf.get("checkpoint_ns"),
            get_checkpoint_id(config) if config else None,
            get_checkpoint_id(before) if before else None,
            None if filter else limit,
        )
        left = limit
        for row in rows:
            metadata = self._loads(row.metadata_type, row.metadata)
            if filter and not all(metadata.get(k) == v for k, v in filter.items()):
                continue
            yield await self._tuple(row, metadata)
            if left is not None:
                left -= 1
                if left == 0:
                    return

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        conf = config["configurable"]
        thread_id, checkpoint_ns = conf["thread_id"], conf.get("checkpoint_ns", "")
        rest: dict[str, Any] = dict(checkpoint)
        values: dict[str, Any] = rest.pop("channel_values")
        blobs = [
            BlobRow(
                channel,
                str(version),
                *(self.serde.dumps_typed(values[channel]) if channel in values else ("empty", b"")),
            )
            for channel, version in new_versions.items()
        ]
        full_metadata = get_checkpoint_metadata(config, metadata)
        run_id = full_metadata.get("run_id")
        row = CheckpointRow(
            thread_id=thread_id,
            checkpoint_ns=checkpoint_ns,
            checkpoint_id=checkpoint["id"],
            parent_checkpoint_id=conf.get("checkpoint_id"),
            graph_run_id=None if run_id is None else str(run_id),
            checkpoint_type=(typed := self.serde.dumps_typed(rest))[0],
            checkpoint=typed[1],
            metadata_type=(typed_md := self.serde.dumps_typed(full_metadata))[0],
            metadata=typed_md[1],
        )
        await self._tables.put_checkpoint(row, blobs, self._fenced)
        return {
            "configurable": {
                "thread_id": thread_id,
                "checkpoint_ns": checkpoint_ns,
                "checkpoint_id": checkpoint["id"],
            }
        }

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        conf = config["configurable"]
        rows = [
            WriteRow(
                task_id,
                WRITES_IDX_MAP.get(channel, idx),
                channel,
                *self.serde.dumps_typed(value),
                task_path,
            )
            for idx, (channel, value) in enumerate(writes)
        ]
        await self._tables.put_writes(
            conf["thread_id"],
            conf.get("checkpoint_ns", ""),
            conf["checkpoint_id"],
            rows,
            self._fenced,
        )

    async def adelete_thread(self, thread_id: str) -> None:
        await self._tables.delete_threads([thread_id], self._fenced)

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        await self._tables.delete_for_runs(list(run_ids), self._fenced)

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        await self._tables.copy_thread(source_thread_id, target_thread_id, self._fenced)

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        if strategy == "keep_latest":
            await self._tables.keep_latest(list(thread_ids), self._fenced)
        elif strategy == "delete":
            await self._tables.delete_threads(list(thread_ids), self._fenced)
        else:
            raise ValueError(f"unknown prune strategy {strategy!r}: use 'keep_latest' or 'delete'")

    def get_next_version(self, current: str | None, channel: None) -> str:
        """Zero-padded, so versions compare as text like the numbers they count."""
        number = 0 if current is None else int(str(current).split(".")[0])
        return f"{number + 1:032}"

    # -- sync interface -----------------------------------------------------

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return self._sync(self.aget_tuple(config))

    def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        async def collect() -> list[CheckpointTuple]:
            return [t async for t in self.alist(config, filter=filter, before=before, limit=limit)]

        yield from self._sync(collect())

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        return self._sync(self.aput(config, checkpoint, metadata, new_versions))

    def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        self._sync(self.aput_writes(config, writes, task_id, task_path))

    def delete_thread(self, thread_id: str) -> None:
        self._sync(self.adelete_thread(thread_id))

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        self._sync(self.adelete_for_runs(run_ids))

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        self._sync(self.acopy_thread(source_thread_id, target_thread_id))

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        self._sync(self.aprune(thread_ids, strategy=strategy))

    # -- helpers ------------------------------------------------------------

    def _sync(self, coro: Any) -> Any:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            coro.close()
            raise RuntimeError(
                "MeshCheckpointSaver's sync methods block: on its event loop use "
                "the async ones (aget_tuple, alist, aput, ...) or graph.ainvoke/astream"
            )
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _loads(self, type_: str, data: bytes) -> Any:
        return self.serde.loads_typed((type_, data))

    async def _tuple(self, row: CheckpointRow, metadata: Any) -> CheckpointTuple:
        checkpoint = self._loads(row.checkpoint_type, row.checkpoint)
        versions = [(ch, str(v)) for ch, v in checkpoint["channel_versions"].items()]
        blobs = await self._tables.blobs(row.thread_id, row.checkpoint_ns, versions)
        writes = await self._tables.writes(row.thread_id, row.checkpoint_ns, row.checkpoint_id)
        where = {"thread_id": row.thread_id, "checkpoint_ns": row.checkpoint_ns}
        return CheckpointTuple(
            config={"configurable": {**where, "checkpoint_id": row.checkpoint_id}},
            checkpoint={  # type: ignore[typeddict-item]
                **checkpoint,
                "channel_values": {
                    b.channel: self._loads(b.value_type, b.value)
                    for b in blobs
                    if b.value_type != "empty"
                },
            },
            metadata=metadata,
            parent_config=(
                {"configurable": {**where, "checkpoint_id": row.parent_checkpoint_id}}
                if row.parent_checkpoint_id
                else None
            ),
            pending_writes=[
                (w.task_id, w.channel, self._loads(w.value_type, w.value)) for w in writes
            ],
        )


# -- the ``langgraph`` built-in agent -------------------------------------------

STREAM_MODES: list[StreamMode] = ["updates", "messages", "custom"]


def load_graph(reference: str) -> Pregel:
    """The compiled graph ``module:attr`` names (a StateGraph is compiled here)."""
    value = resolve(reference)
    if isinstance(value, StateGraph):
        value = value.compile()
    if not isinstance(value, Pregel):
        raise RunError(f"{reference!r} is a {type(value).__name__}, not a compiled LangGraph graph")
    return value


@agent("langgraph", check=check_graph_input)
async def run_graph(ctx: RunContext, input: dict[str, Any]) -> Any:
    """Run the graph with thread_id = the run id and checkpoints in the run's
    storage. A resumed attempt finds the thread's checkpoints and continues
    from the last one (input None) instead of starting over; an interrupted
    graph waits for a ``resume`` signal and continues with its data."""
    if not isinstance(ctx, RunContext):
        raise RunError(
            "the langgraph agent runs in the peer's process only (its checkpoints need the "
            'storage connection): submit it without isolation "process"'
        )
    graph = load_graph(input["graph"]).copy(
        update={"checkpointer": MeshCheckpointSaver.for_run(ctx)}
    )
    user = dict(input.get("config") or {})
    config: RunnableConfig = {
        **user,
        "configurable": {
            **user.get("configurable", {}),
            "thread_id": ctx.run_id,
            **_endpoint(ctx, input),
        },
    }
    journaled = await _replay_flow(ctx)
    try:
        state = await graph.aget_state(config)
        command: Any = input["input"] if state.created_at is None else None
        streamed = False
        while True:
            if state.interrupts:
                # After a stream, the graph took the journaled answer or
                # left it (data for other interrupts): either way, ask anew.
                answer = await _answer(ctx, state.interrupts, None if streamed else journaled)
                command = Command(resume=answer)
            elif streamed:
                if state.next:
                    raise RunError(
                        f"the graph stopped before {list(state.next)} without interrupt(): "
                        "static breakpoints (interrupt_before/after) cannot be resumed on "
                        "the mesh; call interrupt() in the node instead"
                    )
                break
            await _stream(ctx, graph, command, config)
            streamed = True
            state = await graph.aget_state(config)
    except StaleEpoch as exc:
        raise Fenced(str(exc)) from exc
    return plain(state.values)


def _endpoint(ctx: RunContext, input: Mapping[str, Any]) -> dict[str, Any]:
    """The peer's model endpoint the input names ("default" unless ``model``),
    for the graph's nodes as ``config["configurable"]["model_endpoint"]``; an
    object, so LangGraph never copies it into checkpoint metadata. The key is
    not in it: a node reads it from the peer's environment (``api_key``).
    Beside it ``model_limit(tokens)``: the endpoint's mesh-wide rate limit, for
    a node to hold around each call (``async with model_limit(tokens=n):``)."""
    endpoint = ctx.models.get(input.get("model", DEFAULT_MODEL))
    if endpoint is None:
        return {}
    return {
        "model_endpoint": endpoint,
        "model_limit": functools.partial(model_capacity, ctx, endpoint.rate_limit),
    }


async def _stream(ctx: RunContext, graph: Pregel, command: Any, config: RunnableConfig) -> None:
    """Run the graph until it ends or stops at an interrupt, its stream as events."""
    # "sync": a super-step's checkpoint is stored before the next one starts,
    # so a node that finished before a crash never runs again.
    stream = graph.astream(command, config, stream_mode=STREAM_MODES, durability="sync")
    part: Any
    async for part in stream:
        mode, chunk = part
        if mode == "messages":
            message, meta = chunk
            ctx.emit(
                "messages",
                {"node": meta.get("langgraph_node"), "content": plain(message.content)},
            )
        elif mode == "updates" and "__interrupt__" in chunk:
            continue  # said once, by the interrupt event of _ask
        else:
            ctx.emit(mode, plain(chunk))


# The agent's own journal entries, all of one name so that a replay can tell
# them apart by value: {"attempt": n} starts an attempt's share of the flow,
# {"interrupts": [...]} is followed by the signal that answered them.
FLOW_STEP = "langgraph:flow"
RESUME_SIGNAL = "resume"


@dataclasses.dataclass(frozen=True)
class _Answer:
    """The data of a ``resume`` signal, and the interrupts it answers (their
    ids, sorted: the order parallel nodes' interrupts are listed in is not
    the graph's to keep)."""

    interrupt_ids: list[str]
    data: Any


async def _replay_flow(ctx: RunContext) -> _Answer | None:
    """Take the earlier attempts' entries again, then start this attempt's own.

    The graph's progress is in its checkpoints, not in the journal, so the
    entries are replayed rather than re-derived; they keep the signals in
    order (the n-th interrupt gets the n-th signal) and give this attempt's
    events places of their own in the flow (without that, a resumed graph's
    events would take places of the earlier attempt's and be taken as
    stored). Returns the last answer journaled, which the graph may not have
    taken yet: the signal came while the run was suspended, or a crash came
    between journaling it and the graph storing it as its resume value."""
    answered: _Answer | None = None
    while True:
        seq, found, entry = ctx.begin_step(FLOW_STEP)
        if not found:
            await ctx.record_step(seq, FLOW_STEP, {"attempt": ctx.attempt})
            return answered
        if "interrupts" in entry:
            answered = await _ask(ctx, entry["interrupts"])


async def _answer(
    ctx: RunContext, interrupts: Sequence[Interrupt], journaled: _Answer | None
) -> Any:
    """The resume value for the graph's pending interrupts: the answer
    journaled for exactly these, or the next ``resume`` signal's data."""
    if journaled is not None and journaled.interrupt_ids == sorted(i.id for i in interrupts):
        return journaled.data
    asked = [{"id": i.id, "value": plain(i.value)} for i in interrupts]
    await ctx.step(FLOW_STEP, lambda: {"interrupts": asked})
    return (await _ask(ctx, asked)).data


async def _ask(ctx: RunContext, asked: list[dict[str, Any]]) -> _Answer:
    """Say which interrupts wait, then wait for the signal that answers them
    (the run leaves its slot meanwhile). A replay emits the event at the same
    place, so it is stored once, even when a crash came right before it."""
    await ctx.emit("interrupt", {"interrupts": asked})
    # LangGraph takes a resume value of None for no answer at all: such a
    # signal is passed over, and the interrupts wait for the next one.
    while (data := await ctx.wait_for_signal(RESUME_SIGNAL)) is None:
        pass
    return _Answer(sorted(a["id"] for a in asked), data)


def plain(value: Any) -> Any:
    """``value`` as msgpack can store it: messages and other models as their
    fields, anything else unknown as its repr."""
    if value is None or isinstance(value, str | int | float | bool | bytes):
        return value
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [plain(v) for v in value]
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return plain(dump())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    return repr(value)
