-- Per-key request counters shared by every server on the database: one row per key
-- and limit, holding the hits of its current fixed window.
CREATE TABLE rate_counters (
    name         TEXT    PRIMARY KEY,
    window_start REAL    NOT NULL,
    hits         INTEGER NOT NULL
);
