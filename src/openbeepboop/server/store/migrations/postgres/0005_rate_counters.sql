-- Per-key request counters shared by every server on the database: one row per key
-- and limit, holding the hits of its current fixed window. Unlogged: a crash only
-- starts the windows over.
CREATE UNLOGGED TABLE rate_counters (
    name         TEXT             PRIMARY KEY,
    window_start DOUBLE PRECISION NOT NULL,
    hits         BIGINT           NOT NULL
);
