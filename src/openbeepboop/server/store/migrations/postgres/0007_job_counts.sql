-- Jobs per (model, status), kept by statement triggers in the transaction of every
-- change, so that /v1/stats and /metrics read a few rows instead of counting every job
-- ever stored. Triggers rather than the store's verbs: every writer (each replica,
-- `prune`, `migrate-db`'s COPY, a hand-made fix) keeps the counts exact.
--
-- The rows are deltas, summed when read: each statement that changes jobs inserts one
-- row per (model, status) it changed. Inserts never wait for each other, so concurrent
-- claims and submits on several replicas do not queue on one counter row's lock (which
-- they would hold until their commit's flush). fold_job_counts (sql/postgres.sql), run
-- with each reaper pass, folds the deltas back into one row per pair, so a read sums
-- the pairs plus the deltas of about one reaper interval: flat in history.
CREATE TABLE job_counts (
    model  TEXT   NOT NULL,
    status TEXT   NOT NULL,
    n      BIGINT NOT NULL
);

CREATE FUNCTION job_counts_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO job_counts (model, status, n)
    SELECT model, status, count(*) FROM new_jobs GROUP BY model, status;
    RETURN NULL;
END $$;

CREATE FUNCTION job_counts_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO job_counts (model, status, n)
    SELECT model, status, sum(d) FROM (
        SELECT model, status, 1 AS d FROM new_jobs
        UNION ALL
        SELECT model, status, -1 AS d FROM old_jobs
    ) AS moved
    GROUP BY model, status HAVING sum(d) <> 0;
    RETURN NULL;
END $$;

CREATE FUNCTION job_counts_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO job_counts (model, status, n)
    SELECT model, status, -count(*) FROM old_jobs GROUP BY model, status;
    RETURN NULL;
END $$;

-- (A trigger with transition tables takes one event and no column list: an UPDATE that
-- changes no status, such as a heartbeat, runs job_counts_update and inserts nothing.)
CREATE TRIGGER job_counts_insert AFTER INSERT ON jobs
    REFERENCING NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION job_counts_insert();
CREATE TRIGGER job_counts_update AFTER UPDATE ON jobs
    REFERENCING OLD TABLE AS old_jobs NEW TABLE AS new_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION job_counts_update();
CREATE TRIGGER job_counts_delete AFTER DELETE ON jobs
    REFERENCING OLD TABLE AS old_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION job_counts_delete();

-- The jobs stored before this migration, counted once, here. CREATE TRIGGER locked jobs
-- against writes until this transaction commits, so no change slips between the two.
INSERT INTO job_counts (model, status, n)
SELECT model, status, count(*) FROM jobs GROUP BY model, status;
