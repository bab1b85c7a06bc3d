-- LangGraph checkpoints (runner/integrations/langgraph.py), kept beside the
-- runs they belong to so that the same transaction can fence them by epoch.
-- A thread is not necessarily a run (a saver can be used outside the mesh),
-- so there is no foreign key to runs.
CREATE TABLE graph_checkpoints (
    thread_id            TEXT NOT NULL,
    checkpoint_ns        TEXT NOT NULL,
    checkpoint_id        TEXT NOT NULL,
    parent_checkpoint_id TEXT,
    -- metadata["run_id"], for delete_for_runs
    graph_run_id         TEXT,
    checkpoint_type      TEXT NOT NULL,
    checkpoint           BLOB NOT NULL,
    metadata_type        TEXT NOT NULL,
    metadata             BLOB NOT NULL,
    PRIMARY KEY (thread_id, checkpoint_ns, checkpoint_id)
);
CREATE INDEX graph_checkpoints_run ON graph_checkpoints (graph_run_id);

-- Channel values by version: a checkpoint stores only the channels that changed.
CREATE TABLE graph_blobs (
    thread_id     TEXT NOT NULL,
    checkpoint_ns TEXT NOT NULL,
    channel       TEXT NOT NULL,
    version       TEXT NOT NULL,
    value_type    TEXT NOT NULL,
    value         BLOB NOT NULL,
    PRIMARY KEY (thread_id, checkpoint_ns, channel, version)
);

-- Pending writes of the tasks of a checkpoint's next super-step.
CREATE TABLE graph_writes (
    thread_id     TEXT NOT NULL,
    checkpoint_ns TEXT NOT NULL,
    checkpoint_id TEXT NOT NULL,
    task_id       TEXT NOT NULL,
    idx           INTEGER NOT NULL,
    channel       TEXT NOT NULL,
    value_type    TEXT NOT NULL,
    value         BLOB NOT NULL,
    task_path     TEXT NOT NULL,
    PRIMARY KEY (thread_id, checkpoint_ns, checkpoint_id, task_id, idx)
);
