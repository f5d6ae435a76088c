-- The queries of SqliteStore (store/sqlite.py), by name (store/queries.py reads them).
-- postgres.sql holds the same names in the same order: a rule of the queue changes in
-- both files. Parameters are numbered (?1, ?2, ...) in the order postgres.sql numbers
-- its $1, $2, ... wherever the two take the same arguments.

-- ======================================================================== jobs

-- name: find_job_by_idempotency_key
-- The job an idempotent replay returns.
SELECT {job_columns} FROM jobs WHERE owner = ?1 AND idempotency_key = ?2;

-- name: insert_job
-- A new job, queued; or, with an answer from the response cache (?17), completed at once
-- and marked cached (its cache_key ?16 is then NULL: nothing to keep).
INSERT INTO jobs (id, owner, endpoint, model, request, request_hash, status, priority,
                  max_attempts, metadata, custom_id, idempotency_key, expires_at, batch_id,
                  pin_node, pin_labels, cache_key, result, cached, started_at, finished_at,
                  created_at)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, CASE WHEN ?17 IS NULL THEN 'queued' ELSE 'completed' END,
        ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?17 IS NOT NULL,
        CASE WHEN ?17 IS NULL THEN NULL ELSE ?18 END,
        CASE WHEN ?17 IS NULL THEN NULL ELSE ?18 END, ?18);

-- name: get_job
SELECT {job_columns} FROM jobs WHERE id = ?1;

-- name: get_jobs
-- ?1: a JSON array of ids.
SELECT {job_columns} FROM jobs WHERE id IN (SELECT value FROM json_each(?1));

-- name: list_jobs
-- {where}: the listing's filters (owner, status, model, batch, seq < cursor, created_at
-- range), filled in by code.
SELECT {job_columns} FROM jobs WHERE {where} ORDER BY seq DESC LIMIT {limit};

-- name: queue_position
-- Queued jobs of the same model that run before this one (priority, then age), as two
-- index ranges of jobs_queued (one OR-ed range reads each row: three times slower), and
-- the jobs pinned to a node (jobs_queued_node, migration 0008), pinned or not.
SELECT (SELECT count(*) FROM jobs
        WHERE status = 'queued' AND pin_node IS NULL AND model = ?1 AND priority > ?2)
     + (SELECT count(*) FROM jobs
        WHERE status = 'queued' AND pin_node IS NULL AND model = ?1 AND priority = ?2
          AND seq < ?3)
     + (SELECT count(*) FROM jobs
        WHERE status = 'queued' AND pin_node IS NOT NULL AND model = ?1
          AND (priority > ?2 OR (priority = ?2 AND seq < ?3)));

-- name: queued_above
-- Fair share's queue_position: the queued jobs of model ?1 that run before a job of
-- priority ?2 (row ?3) whatever their share: those of a higher priority, and those
-- pinned to a node that are ahead by priority and age (they go to their node alone).
SELECT (SELECT count(*) FROM jobs
        WHERE status = 'queued' AND pin_node IS NULL AND model = ?1 AND priority > ?2)
     + (SELECT count(*) FROM jobs
        WHERE status = 'queued' AND pin_node IS NOT NULL AND model = ?1
          AND (priority > ?2 OR (priority = ?2 AND seq < ?3)));

-- name: owner_queued
-- Fair share's queue_position: owner ?2's queued jobs of model ?1 at priority ?3
-- older than row ?4, pinned to no node, counted up to ?5 (an index range of
-- jobs_queued_owner: the count costs what it finds).
SELECT count(*) FROM (
    SELECT 1 FROM jobs
    WHERE status = 'queued' AND pin_node IS NULL AND model = ?1 AND owner = ?2
      AND priority = ?3 AND seq < ?4
    LIMIT ?5
) AS counted;

-- name: queue_head
-- When the job a model's queue serves next was queued (model affinity: how long another
-- model's next job has waited): one seek of jobs_queued, the model ?1, now ?2.
SELECT created_at FROM jobs
WHERE status = 'queued' AND pin_node IS NULL AND model = ?1
  AND (expires_at IS NULL OR expires_at > ?2)
ORDER BY priority DESC, seq LIMIT 1;

-- name: queued_ahead
-- queue_position of a job just queued (the newest of its priority), on the writer: the
-- queued jobs of its model at its priority or higher, less itself, from the counters of
-- track_queued (a sum over a few rows; counting the queue cost O(depth) per submit).
SELECT coalesce(sum(queued), 0) - 1 FROM temp.queued_counts
WHERE model = ?1 AND priority >= ?2;

-- name: claim_jobs
-- Lease up to ?2 queued jobs of the wanted models, highest priority first, then oldest;
-- each gets a fresh lease id, the lease's expiry ?3 and one more attempt; ?1 now, ?4 the
-- node's id, ?5 its name, ?6 its labels (a JSON object). {candidates}: one
-- claim_candidates per model (named by ?7, ?8, ...), joined by UNION ALL: each walks the
-- indexes of its model and stops after ?2 rows it may take, however long the queue.
-- (PostgreSQL takes the models as one array: its order differs.)
UPDATE jobs SET status = 'in_progress', lease_id = lower(hex(randomblob(16))),
    lease_expires_at = ?3, attempts = attempts + 1, node_id = ?4, started_at = ?1
WHERE seq IN (SELECT seq FROM ({candidates}) ORDER BY priority DESC, seq LIMIT ?2)
RETURNING {job_columns};

-- name: claim_candidates
-- Two walks: the jobs pinned to no node (jobs_queued), and those pinned to this node, by
-- its id ?4 or its name ?5 (jobs_queued_node): jobs pinned to other nodes are not read.
-- A job pinned to labels only for a node carrying each of them (no label of the job
-- missing from ?6); an unpinned job passes at the first test.
SELECT * FROM (
    SELECT seq, priority FROM jobs
    WHERE status = 'queued' AND pin_node IS NULL AND model = {model}
      AND (expires_at IS NULL OR expires_at > ?1)
      AND (pin_labels IS NULL OR NOT EXISTS (
          SELECT 1 FROM json_each(pin_labels) AS want
          WHERE NOT EXISTS (SELECT 1 FROM json_each(?6) AS have
                            WHERE have.key = want.key AND have.value = want.value)))
    ORDER BY priority DESC, seq LIMIT ?2
)
UNION ALL
SELECT * FROM (
    SELECT seq, priority FROM jobs
    WHERE status = 'queued' AND pin_node IS NOT NULL AND model = {model}
      AND pin_node IN (?4, ?5) AND (expires_at IS NULL OR expires_at > ?1)
      AND (pin_labels IS NULL OR NOT EXISTS (
          SELECT 1 FROM json_each(pin_labels) AS want
          WHERE NOT EXISTS (SELECT 1 FROM json_each(?6) AS have
                            WHERE have.key = want.key AND have.value = want.value)))
    ORDER BY priority DESC, seq LIMIT ?2
);

-- name: queued_owners
-- Fair share's queue_position: the owners with queued jobs of model ?1 that are pinned to
-- no node, one index seek each (a skip scan of jobs_queued_owner), however many each has.
WITH RECURSIVE o(owner) AS (
    SELECT (SELECT owner FROM jobs
            WHERE status = 'queued' AND pin_node IS NULL AND model = ?1
            ORDER BY owner LIMIT 1)
    UNION ALL
    SELECT (SELECT owner FROM jobs
            WHERE status = 'queued' AND pin_node IS NULL AND model = ?1 AND owner > o.owner
            ORDER BY owner LIMIT 1)
    FROM o WHERE o.owner IS NOT NULL
)
SELECT owner FROM o WHERE owner IS NOT NULL;

-- name: queued_heads
-- The fair claim: each owner's first queued job of model ?1 (priority, then age) that the
-- node may take (not expired at ?2, its labels ?3 carry every label the job asks for),
-- pinned to no node: one index seek per owner (a skip scan of jobs_queued_owner, each
-- step the next owner's first job), however many jobs each has queued.
WITH RECURSIVE h(seq, priority, owner) AS (
    SELECT * FROM (
        SELECT seq, priority, owner FROM jobs
        WHERE status = 'queued' AND pin_node IS NULL AND model = ?1
          AND (expires_at IS NULL OR expires_at > ?2)
          AND (pin_labels IS NULL OR NOT EXISTS (
              SELECT 1 FROM json_each(pin_labels) AS want
              WHERE NOT EXISTS (SELECT 1 FROM json_each(?3) AS have
                                WHERE have.key = want.key AND have.value = want.value)))
        ORDER BY owner, priority DESC, seq LIMIT 1
    )
    UNION ALL
    SELECT j.seq, j.priority, j.owner FROM h JOIN jobs AS j ON j.seq = (
        SELECT seq FROM jobs
        WHERE status = 'queued' AND pin_node IS NULL AND model = ?1 AND owner > h.owner
          AND (expires_at IS NULL OR expires_at > ?2)
          AND (pin_labels IS NULL OR NOT EXISTS (
              SELECT 1 FROM json_each(pin_labels) AS want
              WHERE NOT EXISTS (SELECT 1 FROM json_each(?3) AS have
                                WHERE have.key = want.key AND have.value = want.value)))
        ORDER BY owner, priority DESC, seq LIMIT 1
    )
)
SELECT seq, priority, owner FROM h;

-- name: owner_candidates
-- The fair claim, when fewer owners than jobs asked for wait: the first ?3 queued jobs
-- of owner ?2 in model ?1 (priority, then age) that the node may take (not expired at ?4, its labels ?5 carry every label a job asks for).
SELECT seq, priority, owner FROM jobs
WHERE status = 'queued' AND pin_node IS NULL AND model = ?1 AND owner = ?2
  AND (expires_at IS NULL OR expires_at > ?4)
  AND (pin_labels IS NULL OR NOT EXISTS (
      SELECT 1 FROM json_each(pin_labels) AS want
      WHERE NOT EXISTS (SELECT 1 FROM json_each(?5) AS have
                        WHERE have.key = want.key AND have.value = want.value)))
ORDER BY priority DESC, seq LIMIT ?3;

-- name: node_candidates
-- Fair share: the first ?4 queued jobs of model ?1 pinned to this node (by its id ?2 or
-- name ?3), with their owners; ?5 now, ?6 the node's labels (as owner_candidates).
SELECT seq, priority, owner FROM jobs
WHERE status = 'queued' AND pin_node IS NOT NULL AND model = ?1 AND pin_node IN (?2, ?3)
  AND (expires_at IS NULL OR expires_at > ?5)
  AND (pin_labels IS NULL OR NOT EXISTS (
      SELECT 1 FROM json_each(pin_labels) AS want
      WHERE NOT EXISTS (SELECT 1 FROM json_each(?6) AS have
                        WHERE have.key = want.key AND have.value = want.value)))
ORDER BY priority DESC, seq LIMIT ?4;

-- name: share_groups
-- The groups of the keys among these owners (?1, a JSON array) that have one.
SELECT id, share_group FROM api_keys
WHERE id IN (SELECT value FROM json_each(?1)) AND share_group IS NOT NULL;

-- name: share_weights
-- The weights an admin set for these shares (?1, a JSON array).
SELECT name, weight FROM shares WHERE name IN (SELECT value FROM json_each(?1));

-- name: turns_of
-- The fair turns of model ?1: its clock (share '') and these shares' (?2, a JSON array).
SELECT share, finish FROM fair_turns
WHERE model = ?1 AND (share = '' OR share IN (SELECT value FROM json_each(?2)));

-- name: put_turn
-- Model ?1's share ?2 (or its clock, share '') now stands at ?3 (never moved back).
INSERT INTO fair_turns (model, share, finish) VALUES (?1, ?2, ?3)
ON CONFLICT (model, share) DO UPDATE SET finish = max(finish, excluded.finish);

-- name: lease_seqs
-- Lease the jobs of these rows (?1, a JSON array of seq) that are still queued, as
-- claim_jobs does: ?2 now, ?3 the lease's expiry, ?4 the node's id.
UPDATE jobs SET status = 'in_progress', lease_id = lower(hex(randomblob(16))),
    lease_expires_at = ?3, attempts = attempts + 1, node_id = ?4, started_at = ?2
WHERE seq IN (SELECT value FROM json_each(?1)) AND status = 'queued'
RETURNING {job_columns};

-- name: extend_leases
-- Heartbeat: the leases (?1, a JSON array) of running jobs now expire at ?2.
UPDATE jobs SET lease_expires_at = ?2
WHERE lease_id IN (SELECT value FROM json_each(?1)) AND status = 'in_progress'
RETURNING lease_id;

-- name: cancelled_leases
-- Heartbeat: which of these leases (?1) belong to jobs cancelled meanwhile.
SELECT lease_id, id FROM jobs
WHERE lease_id IN (SELECT value FROM json_each(?1)) AND status = 'cancelled';

-- name: complete_job
-- Fencing: only the job's current lease (?2) may record its result (?3) at ?4.
UPDATE jobs SET status = 'completed', result = ?3, error = NULL, finished_at = ?4
WHERE id = ?1 AND lease_id = ?2 AND status = 'in_progress'
RETURNING {job_columns};

-- name: release_job
-- Handed back unfinished by a draining node, or leased by a fetch whose answer could not
-- be delivered (Store.release_lease): queued again, the attempt not counted.
UPDATE jobs SET status = 'queued', attempts = max(attempts - 1, 0), lease_id = NULL,
    lease_expires_at = NULL, node_id = NULL
WHERE id = ?1 AND lease_id = ?2 AND status = 'in_progress'
RETURNING {job_columns};

-- name: fail_job
-- Retry or fail: a retryable error (?5) with attempts left queues the job again;
-- otherwise it fails, keeping the error (?3) and the lease that reported it.
UPDATE jobs SET error = ?3,
    status = CASE WHEN NOT ?5 OR attempts >= max_attempts THEN 'failed' ELSE 'queued' END,
    finished_at = CASE WHEN NOT ?5 OR attempts >= max_attempts THEN ?4 ELSE NULL END,
    lease_id = CASE WHEN NOT ?5 OR attempts >= max_attempts THEN lease_id ELSE NULL END,
    node_id = CASE WHEN NOT ?5 OR attempts >= max_attempts THEN node_id ELSE NULL END,
    lease_expires_at = NULL
WHERE id = ?1 AND lease_id = ?2 AND status = 'in_progress'
RETURNING {job_columns};

-- name: move_job
-- An alias's job moves to its next member (Store.move_job): model ?3, request ?4, queued
-- again with its attempts at 0 and no cache key; from in_progress under the lease ?2 (the
-- member's error ?5 kept), or, with ?2 NULL, from queued.
UPDATE jobs SET model = ?3, request = ?4, status = 'queued', attempts = 0, cache_key = NULL,
    error = coalesce(?5, error), lease_id = NULL, lease_expires_at = NULL, node_id = NULL
WHERE id = ?1 AND ((?2 IS NULL AND status = 'queued')
                   OR (lease_id = ?2 AND status = 'in_progress'))
RETURNING {job_columns};

-- name: job_statuses
-- Why results were refused: the status of each job (?1, a JSON array of ids).
SELECT id, status FROM jobs WHERE id IN (SELECT value FROM json_each(?1));

-- name: cancel_job
-- A job that is not final is cancelled at ?2 (its node hears of it through its watch, or heartbeat).
UPDATE jobs SET status = 'cancelled', finished_at = ?2
WHERE id = ?1 AND status IN ('queued', 'in_progress')
RETURNING {job_columns};

-- name: reap_leases
-- Leases that expired by ?1: the job expires (past expires_at), fails when its attempts
-- are used up (the last error kept inside), or is queued again.
UPDATE jobs SET
    status = CASE WHEN expires_at IS NOT NULL AND expires_at <= ?1 THEN 'expired'
                  WHEN attempts >= max_attempts THEN 'failed'
                  ELSE 'queued' END,
    error = CASE WHEN attempts >= max_attempts
                      AND NOT (expires_at IS NOT NULL AND expires_at <= ?1)
                 THEN json_object('code', 'attempts_exhausted',
                                  'message', 'the lease expired on attempt ' || attempts
                                             || ' of ' || max_attempts || ' without a result',
                                  'last_error', json(error))
                 ELSE error END,
    finished_at = CASE WHEN (expires_at IS NOT NULL AND expires_at <= ?1)
                            OR attempts >= max_attempts
                       THEN ?1 ELSE NULL END,
    lease_id = NULL, lease_expires_at = NULL, node_id = NULL
WHERE status = 'in_progress' AND lease_expires_at <= ?1
RETURNING id, status;

-- name: reap_queued
-- Queued jobs whose expires_at passed by ?1 expire.
UPDATE jobs SET status = 'expired', finished_at = ?1
WHERE status = 'queued' AND expires_at <= ?1
RETURNING id;

-- name: watch_leases
-- A reaper pass at ?1: leases are watched (the latest time of any server is kept).
INSERT INTO lease_watch (id, watched_at) VALUES (1, ?1)
ON CONFLICT (id) DO UPDATE SET watched_at = max(watched_at, excluded.watched_at);

-- name: leases_watched_at
SELECT watched_at FROM lease_watch WHERE id = 1;

-- name: resume_leases
-- After an outage: leases still live when servers last watched them at ?1 (every lease
-- when ?1 is NULL: never recorded) expire no sooner than ?2.
UPDATE jobs SET lease_expires_at = max(lease_expires_at, ?2)
WHERE status = 'in_progress' AND (?1 IS NULL OR lease_expires_at > ?1)
RETURNING id;

-- name: count_active
SELECT count(*) FROM jobs WHERE owner = ?1 AND status IN ('queued', 'in_progress');

-- name: job_counts
-- Jobs per model and status: the counters the triggers of migration 0007 keep.
SELECT model, status, n FROM job_counts WHERE n > 0;

-- name: finished_counts
-- Jobs that completed or failed with finished_at in [?1, ?2), per step of ?3 seconds
-- from ?1, model and status (the overview's throughput); the index jobs_finished
-- (status, finished_at) reads only the jobs of that window.
SELECT CAST((finished_at - ?1) / ?3 AS INTEGER) AS step, model, status, count(*)
FROM jobs
WHERE status IN ('completed', 'failed') AND finished_at >= ?1 AND finished_at < ?2
GROUP BY step, model, status;

-- name: recent_runs
-- Per model, the jobs nodes ran that completed or failed at or after ?1 (not answered
-- by the response cache): how many, their time in progress summed, the earliest start
-- and the latest finish (core/eta.py: the model's pace). The index jobs_finished
-- (status, finished_at) reads only the jobs of that window.
SELECT model, count(*), sum(finished_at - started_at), min(started_at), max(finished_at)
FROM jobs
WHERE status IN ('completed', 'failed') AND finished_at >= ?1
  AND started_at IS NOT NULL AND cached = 0
GROUP BY model;

-- name: track_queued
-- Run once on the writer's connection (a script): counters of queued jobs per model and
-- priority, in a TEMP table (the writer is the only connection that changes jobs). The
-- two hot changes, a job queued by a submit and jobs leased by a claim, are counted by
-- those verbs themselves, once per (model, priority) with count_queued (a trigger per
-- row cost a fifth of a bulk submit's throughput); TEMP triggers count every other
-- change of a job's status. Each job that can still be queued has its (model, priority)
-- row: made when it was queued, or here.
CREATE TEMP TABLE queued_counts (
    model    TEXT    NOT NULL,
    priority INTEGER NOT NULL,
    queued   INTEGER NOT NULL,
    PRIMARY KEY (model, priority)
) WITHOUT ROWID;
INSERT INTO temp.queued_counts (model, priority, queued)
SELECT model, priority, sum(status = 'queued') FROM jobs
WHERE status IN ('queued', 'in_progress') GROUP BY model, priority;
CREATE TEMP TRIGGER jobs_queued_move AFTER UPDATE OF status ON main.jobs
WHEN (old.status = 'queued') != (new.status = 'queued')
     AND NOT (old.status = 'queued' AND new.status = 'in_progress')
BEGIN
    UPDATE queued_counts SET queued = queued + (new.status = 'queued') - (old.status = 'queued')
    WHERE model = new.model AND priority = new.priority;
END;
CREATE TEMP TRIGGER jobs_queued_delete AFTER DELETE ON main.jobs WHEN old.status = 'queued'
BEGIN
    UPDATE queued_counts SET queued = queued - 1
    WHERE model = old.model AND priority = old.priority;
END;

-- name: count_queued
-- ?3 more (or, negative, fewer) queued jobs of model ?1 at priority ?2.
INSERT INTO temp.queued_counts (model, priority, queued) VALUES (?1, ?2, ?3)
ON CONFLICT (model, priority) DO UPDATE SET queued = queued + excluded.queued;

-- ======================================================================== nodes

-- name: upsert_node
INSERT INTO nodes ({node_columns}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
ON CONFLICT (id) DO UPDATE SET name = excluded.name, owner = excluded.owner,
    models = excluded.models, capacity = excluded.capacity, hardware = excluded.hardware,
    version = excluded.version, registered_at = excluded.registered_at,
    last_seen = excluded.last_seen, stats = excluded.stats, labels = excluded.labels;

-- name: forget_stale_namesakes
-- A node registering: rows of earlier nodes of the same key (?1) and name (?2), not seen
-- since ?3 (restarts of this node), go.
DELETE FROM nodes WHERE owner = ?1 AND name = ?2 AND last_seen < ?3;

-- name: forget_nodes
-- Rows of nodes not seen since ?1 go.
DELETE FROM nodes WHERE last_seen < ?1;

-- name: touch_node
UPDATE nodes SET last_seen = ?1 WHERE id = ?2;

-- name: touch_node_stats
UPDATE nodes SET last_seen = ?1, stats = ?3 WHERE id = ?2;

-- name: get_node
SELECT {node_columns} FROM nodes WHERE id = ?1;

-- name: list_nodes
SELECT {node_columns} FROM nodes WHERE last_seen >= ?1 ORDER BY registered_at;

-- ======================================================================== keys

-- name: insert_key
INSERT INTO api_keys ({key_columns}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8);

-- name: get_key_by_hash
SELECT {key_columns} FROM api_keys WHERE key_hash = ?1;

-- name: list_keys
SELECT {key_columns} FROM api_keys ORDER BY created_at, id;

-- name: revoke_key
UPDATE api_keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL;

-- name: get_key
SELECT {key_columns} FROM api_keys WHERE id = ?1;

-- name: set_key_group
-- The share group of key ?1 is now ?2 (NULL: none): its queued jobs count there too.
UPDATE api_keys SET share_group = ?2 WHERE id = ?1 RETURNING {key_columns};

-- name: put_share
INSERT INTO shares ({share_columns}) VALUES (?1, ?2, ?3, ?4, ?5)
ON CONFLICT (name) DO UPDATE SET weight = excluded.weight,
    jobs_per_hour = excluded.jobs_per_hour, tokens_per_hour = excluded.tokens_per_hour,
    updated_at = excluded.updated_at;

-- name: list_shares
SELECT {share_columns} FROM shares ORDER BY name;

-- name: delete_share
DELETE FROM shares WHERE name = ?1;

-- name: add_revocations
-- Swarm revocations (key ids ?1, times ?2, origins ?3: JSON arrays of one length) not
-- yet known here: the ids of the new ones.
INSERT INTO swarm_revocations (key_id, revoked_at, origin)
SELECT k.value, t.value, o.value
FROM json_each(?1) AS k JOIN json_each(?2) AS t ON t.key = k.key
JOIN json_each(?3) AS o ON o.key = k.key
WHERE true
ON CONFLICT (key_id) DO NOTHING
RETURNING key_id;

-- name: revoke_swarm_revoked_keys
-- Every key here that the swarm revoked, and that is not yet revoked here, is now
-- (in the transaction of add_revocations: a key never outlives its revocation).
UPDATE api_keys SET revoked_at = r.revoked_at
FROM swarm_revocations AS r
WHERE r.key_id = api_keys.id AND api_keys.revoked_at IS NULL;

-- name: list_revocations
SELECT key_id, revoked_at, origin FROM swarm_revocations ORDER BY key_id;

-- name: get_revocation
SELECT key_id, revoked_at, origin FROM swarm_revocations WHERE key_id = ?1;

-- ======================================================================== web sessions

-- name: insert_session
INSERT INTO web_sessions ({session_columns}) VALUES (?1, ?2, ?3, ?4, ?5);

-- name: get_session
SELECT {session_columns} FROM web_sessions WHERE id_hash = ?1 AND expires_at > ?2;

-- name: delete_session
DELETE FROM web_sessions WHERE id_hash = ?1;

-- name: prune_sessions
DELETE FROM web_sessions WHERE expires_at <= ?1;

-- ======================================================================== files

-- name: put_file_part
INSERT INTO file_parts (file_id, idx, data) VALUES (?1, ?2, ?3)
ON CONFLICT (file_id, idx) DO UPDATE SET data = excluded.data;

-- name: insert_file
INSERT INTO files (id, owner, purpose, filename, bytes, created_at, lines, expires_at)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
RETURNING seq;

-- name: get_file
SELECT {file_columns} FROM files WHERE id = ?1;

-- name: list_files
SELECT {file_columns} FROM files WHERE {where} ORDER BY seq DESC LIMIT {limit};

-- name: read_file_part
SELECT data FROM file_parts WHERE file_id = ?1 AND idx = ?2;

-- name: delete_file_parts
DELETE FROM file_parts WHERE file_id = ?1;

-- name: delete_file
DELETE FROM files WHERE id = ?1 RETURNING id;

-- ======================================================================== batches

-- name: insert_batch
INSERT INTO batches ({batch_fields}) VALUES ({batch_marks}) RETURNING seq;

-- name: save_batch
-- Optimistic concurrency: written only if the stored version is still ?2.
UPDATE batches SET {batch_sets} WHERE id = ?1 AND version = ?2;

-- name: get_batch
SELECT {batch_columns} FROM batches WHERE id = ?1;

-- name: list_batches
SELECT {batch_columns} FROM batches WHERE {where} ORDER BY seq DESC LIMIT {limit};

-- name: open_batches
SELECT {batch_columns} FROM batches
WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling') ORDER BY seq;

-- name: batch_counts
SELECT status, count(*) FROM jobs WHERE batch_id = ?1 GROUP BY status;

-- name: batch_jobs
SELECT {job_columns} FROM jobs WHERE batch_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3;

-- name: cancel_batch_jobs
-- The batch's queued jobs are cancelled at ?2; running ones finish.
UPDATE jobs SET status = 'cancelled', finished_at = ?2
WHERE batch_id = ?1 AND status = 'queued'
RETURNING id;

-- ======================================================================== retention

-- name: delete_job
-- One job, when it is final (a running job's lease and result still need its row).
DELETE FROM jobs WHERE id = ?1
  AND status IN ('completed', 'failed', 'cancelled', 'expired')
RETURNING id;

-- name: forget_cached_answer
-- The response cache's answer made by job ?1 (its owner deleted it).
DELETE FROM response_cache WHERE job_id = ?1;

-- name: prune_jobs
-- Up to ?3 jobs of the final status ?1 that finished before ?2, oldest first. Never a
-- job that is not final, nor one of a batch still running (its output is not written).
DELETE FROM jobs WHERE seq IN (
    SELECT seq FROM jobs AS j
    WHERE j.status = ?1 AND j.finished_at < ?2
      AND j.status IN ('completed', 'failed', 'cancelled', 'expired')
      AND (j.batch_id IS NULL OR NOT EXISTS (
          SELECT 1 FROM batches AS b WHERE b.id = j.batch_id
          AND b.status IN ('validating', 'in_progress', 'finalizing', 'cancelling')))
    ORDER BY j.finished_at LIMIT ?3
);

-- name: count_prunable_jobs
-- How many jobs prune_jobs would delete for status ?1 and cutoff ?2 (no limit).
SELECT count(*) FROM jobs AS j
WHERE j.status = ?1 AND j.finished_at < ?2
  AND j.status IN ('completed', 'failed', 'cancelled', 'expired')
  AND (j.batch_id IS NULL OR NOT EXISTS (
      SELECT 1 FROM batches AS b WHERE b.id = j.batch_id
      AND b.status IN ('validating', 'in_progress', 'finalizing', 'cancelling')));

-- name: prune_batches
-- Up to ?2 final batches that finished before ?1 (their files follow: prune_file).
DELETE FROM batches WHERE seq IN (
    SELECT seq FROM batches
    WHERE status IN ('completed', 'failed', 'expired', 'cancelled')
      AND coalesce(completed_at, failed_at, expired_at, cancelled_at, created_at) < ?1
    ORDER BY seq LIMIT ?2
);

-- name: count_prunable_batches
SELECT count(*) FROM batches
WHERE status IN ('completed', 'failed', 'expired', 'cancelled')
  AND coalesce(completed_at, failed_at, expired_at, cancelled_at, created_at) < ?1;

-- name: prunable_files
-- Up to ?3 files that may go at ?1: expired, or (without an expiry) a batch's file that
-- no batch uses any more, made before ?2. Never a file of a batch still running.
SELECT id FROM files AS f
WHERE (f.expires_at <= ?1
       OR (f.expires_at IS NULL AND f.purpose IN ('batch', 'batch_output') AND f.created_at < ?2
           AND NOT EXISTS (SELECT 1 FROM batches AS b WHERE b.input_file_id = f.id)
           AND NOT EXISTS (SELECT 1 FROM batches AS b WHERE b.output_file_id = f.id)
           AND NOT EXISTS (SELECT 1 FROM batches AS b WHERE b.error_file_id = f.id)))
  AND NOT EXISTS (
      SELECT 1 FROM batches AS b
      WHERE b.status IN ('validating', 'in_progress', 'finalizing', 'cancelling')
        AND f.id IN (b.input_file_id, b.output_file_id, b.error_file_id))
ORDER BY f.seq LIMIT ?3;

-- name: prune_file
-- The file ?1's record, if it still may go (as prunable_files, at ?2 and ?3).
DELETE FROM files AS f
WHERE f.id = ?1
  AND (f.expires_at <= ?2
       OR (f.expires_at IS NULL AND f.purpose IN ('batch', 'batch_output') AND f.created_at < ?3
           AND NOT EXISTS (SELECT 1 FROM batches AS b WHERE b.input_file_id = f.id)
           AND NOT EXISTS (SELECT 1 FROM batches AS b WHERE b.output_file_id = f.id)
           AND NOT EXISTS (SELECT 1 FROM batches AS b WHERE b.error_file_id = f.id)))
  AND NOT EXISTS (
      SELECT 1 FROM batches AS b
      WHERE b.status IN ('validating', 'in_progress', 'finalizing', 'cancelling')
        AND f.id IN (b.input_file_id, b.output_file_id, b.error_file_id))
RETURNING id;

-- name: prune_file_parts
-- The parts of file ?1 once its record is gone.
DELETE FROM file_parts
WHERE file_id = ?1 AND NOT EXISTS (SELECT 1 FROM files WHERE id = ?1);

-- name: owner_file_bytes
-- The bytes of every file key ?1 owns (its quota counts them).
SELECT coalesce(sum(bytes), 0) FROM files WHERE owner = ?1;

-- ======================================================================== templates

-- name: put_template
INSERT INTO templates ({template_columns}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
ON CONFLICT (owner, name) DO UPDATE SET description = excluded.description,
    streams = excluded.streams, updated_at = excluded.updated_at
RETURNING {template_columns};

-- name: get_template
SELECT {template_columns} FROM templates WHERE owner = ?1 AND name = ?2;

-- name: list_templates
SELECT {template_columns} FROM templates WHERE {where} ORDER BY name, owner;

-- name: delete_template
DELETE FROM templates WHERE owner = ?1 AND name = ?2;

-- ======================================================================== rate limits

-- name: hit_counters
-- One hit of each counter named in ?1 (a JSON array), in the window starting at the
-- same place in ?2: each counter's hits so far in its current window, and that window's
-- start. A later window starts over; a hit stamped with an earlier window (another
-- server's clock) counts in the current one.
INSERT INTO rate_counters (name, window_start, hits)
SELECT n.value, w.value, 1 FROM json_each(?1) AS n JOIN json_each(?2) AS w ON w.key = n.key
WHERE true
ON CONFLICT (name) DO UPDATE SET
    hits = CASE WHEN excluded.window_start > rate_counters.window_start THEN 1
                ELSE rate_counters.hits + 1 END,
    window_start = max(rate_counters.window_start, excluded.window_start)
RETURNING name, hits, window_start;

-- name: add_counters
-- Add ?3 to each counter named in ?1, in the window starting at the same place in ?2
-- (JSON arrays; quotas: core/quotas.py): each counter's total in its current window
-- (never below 0) and that window's start. A later window starts over at the amount; an
-- amount stamped with an earlier window than the counter's is dropped (that window is
-- over).
WITH t AS (
    SELECT n.value AS n, w.value AS w, a.value AS a
    FROM json_each(?1) AS n JOIN json_each(?2) AS w ON w.key = n.key
    JOIN json_each(?3) AS a ON a.key = n.key
)
INSERT INTO rate_counters (name, window_start, hits)
SELECT n, w, max(a, 0) FROM t WHERE true
ON CONFLICT (name) DO UPDATE SET
    hits = CASE WHEN excluded.window_start > rate_counters.window_start THEN excluded.hits
                WHEN excluded.window_start < rate_counters.window_start THEN rate_counters.hits
                ELSE max(rate_counters.hits + (SELECT a FROM t WHERE t.n = excluded.name), 0)
           END,
    window_start = max(rate_counters.window_start, excluded.window_start)
RETURNING name, hits, window_start;

-- ======================================================================== response cache

-- name: cache_lookup
-- The answers kept under the keys ?1 (a JSON array), made at or after ?2 (older ones
-- expired; the reaper deletes them).
SELECT key, result FROM response_cache
WHERE key IN (SELECT value FROM json_each(?1)) AND created_at >= ?2;

-- name: cache_used
-- Hits counted by a server since its last pass: ?1 keys, ?2 how many hits each (JSON
-- arrays, pairwise), last used at ?3.
UPDATE response_cache SET hits = hits + u.n, used_at = max(used_at, ?3)
FROM (SELECT k.value AS key, n.value AS n FROM json_each(?1) AS k
      JOIN json_each(?2) AS n ON n.key = k.key) AS u
WHERE response_cache.key = u.key;

-- name: cache_expire
-- Up to ?2 answers made before ?1.
DELETE FROM response_cache
WHERE key IN (SELECT key FROM response_cache WHERE created_at < ?1 LIMIT ?2);

-- name: cache_summary
SELECT count(*), coalesce(sum(bytes), 0), coalesce(sum(hits), 0) FROM response_cache;

-- name: cache_oldest_used
-- The least recently used answers, ?1 of them: what eviction takes first.
SELECT key, bytes FROM response_cache ORDER BY used_at, key LIMIT ?1;

-- name: cache_delete
-- The answers under the keys ?1 (a JSON array).
DELETE FROM response_cache WHERE key IN (SELECT value FROM json_each(?1));

-- name: cache_clear
-- Every answer, or those of model ?1.
DELETE FROM response_cache WHERE ?1 IS NULL OR model = ?1;
