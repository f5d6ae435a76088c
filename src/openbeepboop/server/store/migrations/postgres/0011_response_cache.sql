-- The response cache (docs/cache.md): answers of completed jobs, by a hash of what was
-- asked (core/cache.py: endpoint, model, the request's sampling fields, and the scope of
-- the key when it is private), shared by every client of every replica.
--
-- jobs.cache_key: set at submit on a job whose answer is to be kept; a trigger copies its
-- result into response_cache in the transaction that completes it, so every writer (each
-- replica, a hand-made fix) keeps the cache, and a result is never cached half-written.
-- jobs.cached: 1 on a job answered from the cache at submit (no node ran it).
ALTER TABLE jobs ADD COLUMN cache_key TEXT;
ALTER TABLE jobs ADD COLUMN cached INTEGER NOT NULL DEFAULT 0;

CREATE TABLE response_cache (
    key        TEXT PRIMARY KEY,
    model      TEXT NOT NULL,
    result     TEXT NOT NULL,
    bytes      BIGINT NOT NULL,
    job_id     TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    used_at    DOUBLE PRECISION NOT NULL,
    hits       BIGINT NOT NULL DEFAULT 0
);
-- eviction: the least recently used first, and the expired (created_at) ones
CREATE INDEX response_cache_used ON response_cache (used_at);
CREATE INDEX response_cache_created ON response_cache (created_at);

-- A row trigger: only jobs with a cache_key pay for it (the WHEN clause).
CREATE FUNCTION response_cache_keep() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO response_cache (key, model, result, bytes, job_id, created_at, used_at)
    VALUES (new.cache_key, new.model, new.result, octet_length(new.result), new.id,
            new.finished_at, new.finished_at)
    ON CONFLICT (key) DO UPDATE SET
        result = excluded.result, bytes = excluded.bytes, job_id = excluded.job_id,
        created_at = excluded.created_at, used_at = excluded.used_at;
    RETURN NULL;
END $$;

CREATE TRIGGER response_cache_keep AFTER UPDATE OF status ON jobs
FOR EACH ROW
WHEN (new.status = 'completed' AND new.cache_key IS NOT NULL AND new.result IS NOT NULL)
EXECUTE FUNCTION response_cache_keep();
