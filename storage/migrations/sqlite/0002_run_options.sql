-- The run spec's fields that have no column of their own (depth, budget,
-- isolation, memory limit, session, placement, and any added later), so that
-- a dead letter is retried exactly as it was submitted.
ALTER TABLE runs ADD COLUMN options TEXT NOT NULL DEFAULT '{}';
