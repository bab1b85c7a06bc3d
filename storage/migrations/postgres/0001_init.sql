-- Runs outlive Raft state: Raft holds only active runs, this table keeps
-- every run's history, ownership epoch and outcome.
CREATE TABLE runs (
    id              TEXT PRIMARY KEY,
    agent           TEXT NOT NULL,
    input           BYTEA NOT NULL,
    tenant          TEXT NOT NULL,
    priority        INTEGER NOT NULL,
    labels          JSONB NOT NULL,
    timeout_s       DOUBLE PRECISION,
    max_attempts    INTEGER NOT NULL,
    idempotency_key TEXT,
    parent_id       TEXT,
    submitted_at_ms BIGINT NOT NULL,
    status          TEXT NOT NULL,
    owner           TEXT,
    epoch           BIGINT NOT NULL,
    attempts        INTEGER NOT NULL,
    result          BYTEA,
    error           TEXT,
    started_at_ms   BIGINT,
    finished_at_ms  BIGINT
);

-- list_runs reads newest first, with or without a status filter; id breaks
-- ties between runs submitted in the same millisecond.
CREATE INDEX runs_newest ON runs (submitted_at_ms DESC, id DESC);
CREATE INDEX runs_status_newest ON runs (status, submitted_at_ms DESC, id DESC);

CREATE TABLE steps (
    run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    seq    INTEGER NOT NULL,
    name   TEXT NOT NULL,
    value  BYTEA NOT NULL,
    epoch  BIGINT NOT NULL,
    peer   TEXT NOT NULL,
    at_ms  BIGINT NOT NULL,
    PRIMARY KEY (run_id, seq)
);

CREATE TABLE events (
    run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    seq    INTEGER NOT NULL,
    kind   TEXT NOT NULL,
    data   BYTEA NOT NULL,
    epoch  BIGINT NOT NULL,
    at_ms  BIGINT NOT NULL,
    PRIMARY KEY (run_id, seq)
);
