-- Runs outlive Raft state: Raft holds only active runs, this table keeps
-- every run's history, ownership epoch and outcome. Labels are JSON text.
CREATE TABLE runs (
    id              TEXT PRIMARY KEY,
    agent           TEXT NOT NULL,
    input           BLOB NOT NULL,
    tenant          TEXT NOT NULL,
    priority        INTEGER NOT NULL,
    labels          TEXT NOT NULL,
    timeout_s       REAL,
    max_attempts    INTEGER NOT NULL,
    idempotency_key TEXT,
    parent_id       TEXT,
    submitted_at_ms INTEGER NOT NULL,
    status          TEXT NOT NULL,
    owner           TEXT,
    epoch           INTEGER NOT NULL,
    attempts        INTEGER NOT NULL,
    result          BLOB,
    error           TEXT,
    started_at_ms   INTEGER,
    finished_at_ms  INTEGER
);

-- list_runs reads newest first, with or without a status filter; id breaks
-- ties between runs submitted in the same millisecond.
CREATE INDEX runs_newest ON runs (submitted_at_ms DESC, id DESC);
CREATE INDEX runs_status_newest ON runs (status, submitted_at_ms DESC, id DESC);

CREATE TABLE steps (
    run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    seq    INTEGER NOT NULL,
    name   TEXT NOT NULL,
    value  BLOB NOT NULL,
    epoch  INTEGER NOT NULL,
    peer   TEXT NOT NULL,
    at_ms  INTEGER NOT NULL,
    PRIMARY KEY (run_id, seq)
);

CREATE TABLE events (
    run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    seq    INTEGER NOT NULL,
    kind   TEXT NOT NULL,
    data   BLOB NOT NULL,
    epoch  INTEGER NOT NULL,
    at_ms  INTEGER NOT NULL,
    PRIMARY KEY (run_id, seq)
);
