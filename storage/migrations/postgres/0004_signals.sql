-- Signals (issue 11): a run's mailbox, durable before the mesh announces
-- them. seq counts from 0 per (run, name) and is dense: a waiting run asks
-- for its next seq. A repeated idempotency key finds the first signal
-- (NULL keys never collide). No foreign key to runs: the API checks the run,
-- and a signal must not wait for the run's row to be recorded.
CREATE TABLE signals (
    run_id          TEXT NOT NULL,
    name            TEXT NOT NULL,
    seq             INTEGER NOT NULL,
    data            BYTEA NOT NULL,
    idempotency_key TEXT,
    at_ms           BIGINT NOT NULL,
    PRIMARY KEY (run_id, name, seq),
    UNIQUE (run_id, name, idempotency_key)
);
