-- Jobs per (model, status), kept by triggers in the transaction of every change, so that
-- /v1/stats and /metrics read a few rows instead of counting every job ever stored.
-- Triggers rather than the store's verbs: every writer (the server, `prune`, a restore,
-- a hand-made fix) keeps the counts exact. One row per pair: SQLite has one writer, so
-- the row is never contended.
CREATE TABLE job_counts (
    model  TEXT    NOT NULL,
    status TEXT    NOT NULL,
    n      INTEGER NOT NULL,
    PRIMARY KEY (model, status)
) WITHOUT ROWID;

CREATE TRIGGER job_counts_insert AFTER INSERT ON jobs
BEGIN
    INSERT INTO job_counts (model, status, n) VALUES (new.model, new.status, 1)
    ON CONFLICT (model, status) DO UPDATE SET n = n + 1;
END;

CREATE TRIGGER job_counts_update AFTER UPDATE OF model, status ON jobs
WHEN old.status IS NOT new.status OR old.model IS NOT new.model
BEGIN
    UPDATE job_counts SET n = n - 1 WHERE model = old.model AND status = old.status;
    INSERT INTO job_counts (model, status, n) VALUES (new.model, new.status, 1)
    ON CONFLICT (model, status) DO UPDATE SET n = n + 1;
END;

-- A delete (pruning history) also drops the pair it empties: models long gone leave
-- no rows behind. (A status change leaves its zero: the pair fills again soon.)
CREATE TRIGGER job_counts_delete AFTER DELETE ON jobs
BEGIN
    UPDATE job_counts SET n = n - 1 WHERE model = old.model AND status = old.status;
    DELETE FROM job_counts WHERE model = old.model AND status = old.status AND n <= 0;
END;

-- The jobs stored before this migration: counted once, here.
INSERT INTO job_counts (model, status, n)
SELECT model, status, count(*) FROM jobs GROUP BY model, status;
