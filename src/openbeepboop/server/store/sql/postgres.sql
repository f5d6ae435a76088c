-- The queries of PostgresStore (store/postgres.py), by name (store/queries.py reads them).
-- sqlite.sql holds the same names in the same order: a rule of the queue changes in
-- both files. Where PostgreSQL does in one statement what SQLite does row by row (bulk
-- inserts and completions), the query's name says so (`insert_jobs`, `complete_jobs`).
-- Claims and the reaper lock rows with SKIP LOCKED: replicas never hand out one job
-- twice and never wait for each other.

-- ======================================================================== jobs

-- name: find_jobs_by_idempotency_keys
-- The jobs idempotent replays return: ?1 owners, ?2 keys, pairwise.
SELECT {jobs_qualified} FROM jobs
JOIN unnest($1::text[], $2::text[]) AS k(owner, key)
  ON jobs.owner = k.owner AND jobs.idempotency_key = k.key;

-- name: insert_jobs
-- New jobs, queued, in order; a job whose (owner, idempotency_key) exists is skipped
-- (the caller looks it up). $1..$17 are columns as arrays, $18 now. A job with an answer
-- from the response cache ($17) is completed at once and marked cached.
INSERT INTO jobs (id, owner, endpoint, model, request, request_hash, status, priority,
                  max_attempts, metadata, custom_id, idempotency_key, expires_at, batch_id,
                  pin_node, pin_labels, cache_key, result, cached, started_at, finished_at,
                  created_at)
SELECT t.id, t.owner, t.endpoint, t.model, t.request, t.request_hash,
       CASE WHEN t.result IS NULL THEN 'queued' ELSE 'completed' END, t.priority,
       t.max_attempts, t.metadata, t.custom_id, t.idempotency_key, t.expires_at, t.batch_id,
       t.pin_node, t.pin_labels, t.cache_key, t.result, (t.result IS NOT NULL)::int,
       CASE WHEN t.result IS NULL THEN NULL ELSE $18::float8 END,
       CASE WHEN t.result IS NULL THEN NULL ELSE $18::float8 END, $18
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
            $7::bigint[], $8::bigint[], $9::text[], $10::text[], $11::text[],
            $12::float8[], $13::text[], $14::text[], $15::text[], $16::text[], $17::text[])
     WITH ORDINALITY AS t(id, owner, endpoint, model, request, request_hash, priority,
                          max_attempts, metadata, custom_id, idempotency_key, expires_at,
                          batch_id, pin_node, pin_labels, cache_key, result, ord)
ORDER BY t.ord
ON CONFLICT (owner, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING id, seq;

-- name: get_job
SELECT {job_columns} FROM jobs WHERE id = $1;

-- name: get_jobs
SELECT {job_columns} FROM jobs WHERE id = ANY($1::text[]);

-- name: list_jobs
-- {where}: the listing's filters (owner, status, model, batch, seq < cursor, created_at
-- range), filled in by code.
SELECT {job_columns} FROM jobs WHERE {where} ORDER BY seq DESC LIMIT {limit};

-- name: queue_position
-- Queued jobs of the same model that run before this one (priority, then age): those
-- pinned to no node (jobs_queued) and those pinned to one (jobs_queued_node).
SELECT (SELECT count(*) FROM jobs
        WHERE status = 'queued' AND pin_node IS NULL AND model = $1
          AND (priority > $2 OR (priority = $2 AND seq < $3)))
     + (SELECT count(*) FROM jobs
        WHERE status = 'queued' AND pin_node IS NOT NULL AND model = $1
          AND (priority > $2 OR (priority = $2 AND seq < $3)));

-- name: queued_owners
-- Fair share: the owners with queued jobs of model $1 that are pinned to no node, one
-- index seek each (a skip scan of jobs_queued_owner), however many jobs each has.
WITH RECURSIVE o(owner) AS (
    SELECT (SELECT owner FROM jobs
            WHERE status = 'queued' AND pin_node IS NULL AND model = $1
            ORDER BY owner LIMIT 1)
    UNION ALL
    SELECT (SELECT owner FROM jobs
            WHERE status = 'queued' AND pin_node IS NULL AND model = $1 AND owner > o.owner
            ORDER BY owner LIMIT 1)
    FROM o WHERE o.owner IS NOT NULL
)
SELECT owner FROM o WHERE owner IS NOT NULL;

-- name: share_groups
-- The groups of the keys among these owners ($1) that have one.
SELECT id, share_group FROM api_keys WHERE id = ANY($1::text[]) AND share_group IS NOT NULL;

-- name: share_weights
-- The weights an admin set for these shares ($1).
SELECT name, weight FROM shares WHERE name = ANY($1::text[]);

-- name: turns_of
-- The fair turns of model $1: its clock (share '') and these shares' ($2).
SELECT share, finish FROM fair_turns WHERE model = $1 AND (share = '' OR share = ANY($2::text[]));

-- name: queued_above
-- Fair share's queue_position: the queued jobs of model $1 that run before a job of
-- priority $2 (row $3) whatever their share: those of a higher priority, and those
-- pinned to a node that are ahead by priority and age (they go to their node alone).
SELECT (SELECT count(*) FROM jobs
        WHERE status = 'queued' AND pin_node IS NULL AND model = $1 AND priority > $2)
     + (SELECT count(*) FROM jobs
        WHERE status = 'queued' AND pin_node IS NOT NULL AND model = $1
          AND (priority > $2 OR (priority = $2 AND seq < $3)));

-- name: owner_queued
-- Fair share's queue_position: owner $2's queued jobs of model $1 at priority $3
-- older than row $4, pinned to no node, counted up to $5 (an index range of
-- jobs_queued_owner: the count costs what it finds).
SELECT count(*) FROM (
    SELECT 1 FROM jobs
    WHERE status = 'queued' AND pin_node IS NULL AND model = $1 AND owner = $2
      AND priority = $3 AND seq < $4
    LIMIT $5
) AS counted;

-- name: queue_head
-- When the job a model's queue serves next was queued (model affinity: how long another
-- model's next job has waited): one seek of jobs_queued, the model $1, now $2.
SELECT created_at FROM jobs
WHERE status = 'queued' AND pin_node IS NULL AND model = $1
  AND (expires_at IS NULL OR expires_at > $2)
ORDER BY priority DESC, seq LIMIT 1;

-- name: queued_ahead
-- queue_position of a job just queued: counted. (SQLite sums counters its writer keeps;
-- here a counter row, updated by every submit and claim of its model on every replica,
-- would serialize them on its lock.)
SELECT (SELECT count(*) FROM jobs
        WHERE status = 'queued' AND pin_node IS NULL AND model = $1
          AND (priority > $2 OR (priority = $2 AND seq < $3)))
     + (SELECT count(*) FROM jobs
        WHERE status = 'queued' AND pin_node IS NOT NULL AND model = $1
          AND (priority > $2 OR (priority = $2 AND seq < $3)));

-- name: claim_jobs
-- Lease up to $3 queued jobs of the models $1, highest priority first, then oldest; each
-- gets a fresh lease id, the lease's expiry $4 and one more attempt; $2 now, $5 the node's
-- id, $6 its name, $7 its labels (a JSON object). Up to $3 candidates per model, each
-- model's best first, locked or skipped. Two walks per model: the jobs pinned to no node
-- (jobs_queued), and those pinned to this node by its id or name (jobs_queued_node):
-- jobs pinned to other nodes are not read. A job pinned to labels only for a node
-- carrying each of them (pin_labels <@ labels); an unpinned job passes at the first test.
WITH free AS (
    SELECT c.seq, c.priority FROM unnest($1::text[]) AS m(name)
    CROSS JOIN LATERAL (
        SELECT seq, priority FROM jobs
        WHERE status = 'queued' AND pin_node IS NULL AND model = m.name
          AND (expires_at IS NULL OR expires_at > $2)
          AND (pin_labels IS NULL OR pin_labels::jsonb <@ $7::jsonb)
        ORDER BY priority DESC, seq
        LIMIT $3
        FOR UPDATE SKIP LOCKED
    ) AS c
), mine AS (
    SELECT c.seq, c.priority FROM unnest($1::text[]) AS m(name)
    CROSS JOIN LATERAL (
        SELECT seq, priority FROM jobs
        WHERE status = 'queued' AND pin_node IS NOT NULL AND model = m.name
          AND pin_node IN ($5, $6::text) AND (expires_at IS NULL OR expires_at > $2)
          AND (pin_labels IS NULL OR pin_labels::jsonb <@ $7::jsonb)
        ORDER BY priority DESC, seq
        LIMIT $3
        FOR UPDATE SKIP LOCKED
    ) AS c
), picked AS (
    SELECT seq FROM (SELECT * FROM free UNION ALL SELECT * FROM mine) AS u
    ORDER BY priority DESC, seq
    LIMIT $3
)
UPDATE jobs SET status = 'in_progress', lease_id = replace(gen_random_uuid()::text, '-', ''),
    lease_expires_at = $4, attempts = attempts + 1, node_id = $5, started_at = $2
WHERE seq IN (SELECT seq FROM picked)
RETURNING {job_columns};

-- name: claim_fair
-- claim_jobs under fair share (store/fair.py), the same arguments, one statement. Per
-- model: the owners with queued jobs pinned to no node (owners: a skip scan of
-- jobs_queued_owner, one index seek each), the first jobs of each (enough for $3 in all:
-- $3 / owners + 1; locking more would only make concurrent claims skip them) and those
-- pinned to this node (locked or skipped); each job's share (its key's group, or its owner) and its
-- start: the share's turn or the model's clock (fair_turns, share ''), whichever is
-- later, plus one turn (1 / weight) per job of the share before it. The highest priority
-- first, then the lowest start past the clock, then the oldest; the turns of the shares
-- served move on (in one order, so that concurrent claims never wait on each other in a
-- cycle).
WITH RECURSIVE owners AS (
    SELECT m.name AS model,
        (SELECT owner FROM jobs
         WHERE status = 'queued' AND pin_node IS NULL AND model = m.name
         ORDER BY owner LIMIT 1) AS owner
    FROM unnest($1::text[]) AS m(name)
    UNION ALL
    SELECT o.model,
        (SELECT owner FROM jobs
         WHERE status = 'queued' AND pin_node IS NULL AND model = o.model AND owner > o.owner
         ORDER BY owner LIMIT 1)
    FROM owners AS o WHERE o.owner IS NOT NULL
), free AS (
    SELECT o.model, c.seq, c.priority, o.owner FROM owners AS o
    CROSS JOIN LATERAL (
        SELECT seq, priority FROM jobs
        WHERE status = 'queued' AND pin_node IS NULL AND model = o.model AND owner = o.owner
          AND (expires_at IS NULL OR expires_at > $2)
          AND (pin_labels IS NULL OR pin_labels::jsonb <@ $7::jsonb)
        ORDER BY priority DESC, seq
        LIMIT least($3, $3 / (SELECT count(owner) FROM owners AS n WHERE n.model = o.model) + 1)
        FOR UPDATE SKIP LOCKED
    ) AS c
    WHERE o.owner IS NOT NULL
), mine AS (
    SELECT m.name AS model, c.seq, c.priority, c.owner FROM unnest($1::text[]) AS m(name)
    CROSS JOIN LATERAL (
        SELECT seq, priority, owner FROM jobs
        WHERE status = 'queued' AND pin_node IS NOT NULL AND model = m.name
          AND pin_node IN ($5, $6::text) AND (expires_at IS NULL OR expires_at > $2)
          AND (pin_labels IS NULL OR pin_labels::jsonb <@ $7::jsonb)
        ORDER BY priority DESC, seq
        LIMIT $3
        FOR UPDATE SKIP LOCKED
    ) AS c
), candidates AS (
    SELECT u.model, u.seq, u.priority, coalesce(k.share_group, u.owner) AS share
    FROM (SELECT * FROM free UNION ALL SELECT * FROM mine) AS u
    LEFT JOIN api_keys AS k ON k.id = u.owner
), scored AS (
    SELECT c.model, c.seq, c.priority, c.share, coalesce(w.weight, 1) AS weight,
        coalesce(clock.finish, 0) AS clock,
        greatest(coalesce(t.finish, 0), coalesce(clock.finish, 0))
            + (row_number() OVER (PARTITION BY c.model, c.share
                                  ORDER BY c.priority DESC, c.seq) - 1)
              / coalesce(w.weight, 1) AS start
    FROM candidates AS c
    LEFT JOIN shares AS w ON w.name = c.share
    LEFT JOIN fair_turns AS t ON t.model = c.model AND t.share = c.share
    LEFT JOIN fair_turns AS clock ON clock.model = c.model AND clock.share = ''
), picked AS (
    SELECT * FROM scored ORDER BY priority DESC, start - clock, seq LIMIT $3
), leased AS (
    UPDATE jobs SET status = 'in_progress',
        lease_id = replace(gen_random_uuid()::text, '-', ''),
        lease_expires_at = $4, attempts = attempts + 1, node_id = $5, started_at = $2
    WHERE seq IN (SELECT seq FROM picked)
    RETURNING {job_columns}
), turned AS (
    INSERT INTO fair_turns (model, share, finish)
    SELECT model, share, finish FROM (
        SELECT model, share, max(start + 1 / weight) AS finish FROM picked
        GROUP BY model, share
        UNION ALL
        SELECT model, '', max(start) FROM picked GROUP BY model
    ) AS moved
    ORDER BY model, share
    ON CONFLICT (model, share) DO UPDATE
    SET finish = greatest(fair_turns.finish, excluded.finish)
)
SELECT * FROM leased;

-- name: extend_leases
-- Heartbeat: the leases ($1) of running jobs now expire at $2.
UPDATE jobs SET lease_expires_at = $2
WHERE lease_id = ANY($1::text[]) AND status = 'in_progress'
RETURNING lease_id;

-- name: cancelled_leases
-- Heartbeat: which of these leases ($1) belong to jobs cancelled meanwhile.
SELECT lease_id, id FROM jobs WHERE lease_id = ANY($1::text[]) AND status = 'cancelled';

-- name: complete_job
-- Fencing: only the job's current lease ($2) may record its result ($3) at $4.
UPDATE jobs SET status = 'completed', result = $3, error = NULL, finished_at = $4
WHERE id = $1 AND lease_id = $2 AND status = 'in_progress'
RETURNING {job_columns};

-- name: complete_jobs
-- complete_job for many results at once: $1 ids, $2 leases, $3 results, pairwise.
UPDATE jobs SET status = 'completed', result = r.result, error = NULL, finished_at = $4
FROM unnest($1::text[], $2::text[], $3::text[]) AS r(id, lease, result)
WHERE jobs.id = r.id AND jobs.lease_id = r.lease AND jobs.status = 'in_progress'
RETURNING {jobs_qualified};

-- name: release_job
-- Handed back unfinished by a draining node, or leased by a fetch whose answer could not
-- be delivered (Store.release_lease): queued again, the attempt not counted.
UPDATE jobs SET status = 'queued', attempts = greatest(attempts - 1, 0), lease_id = NULL,
    lease_expires_at = NULL, node_id = NULL
WHERE id = $1 AND lease_id = $2 AND status = 'in_progress'
RETURNING {job_columns};

-- name: fail_job
-- Retry or fail: a retryable error ($5) with attempts left queues the job again;
-- otherwise it fails, keeping the error ($3) and the lease that reported it.
UPDATE jobs SET error = $3,
    status = CASE WHEN NOT $5::boolean OR attempts >= max_attempts
                  THEN 'failed' ELSE 'queued' END,
    finished_at = CASE WHEN NOT $5::boolean OR attempts >= max_attempts
                       THEN $4::float8 ELSE NULL END,
    lease_id = CASE WHEN NOT $5::boolean OR attempts >= max_attempts
                    THEN lease_id ELSE NULL END,
    node_id = CASE WHEN NOT $5::boolean OR attempts >= max_attempts
                   THEN node_id ELSE NULL END,
    lease_expires_at = NULL
WHERE id = $1 AND lease_id = $2 AND status = 'in_progress'
RETURNING {job_columns};

-- name: move_job
-- An alias's job moves to its next member (Store.move_job): model $3, request $4, queued
-- again with its attempts at 0 and no cache key; from in_progress under the lease $2 (the
-- member's error $5 kept), or, with $2 NULL, from queued.
UPDATE jobs SET model = $3, request = $4, status = 'queued', attempts = 0, cache_key = NULL,
    error = coalesce($5::text, error), lease_id = NULL, lease_expires_at = NULL, node_id = NULL
WHERE id = $1 AND (($2::text IS NULL AND status = 'queued')
                   OR (lease_id = $2::text AND status = 'in_progress'))
RETURNING {job_columns};

-- name: job_statuses
-- Why results were refused: the status of each job ($1).
SELECT id, status FROM jobs WHERE id = ANY($1::text[]);

-- name: cancel_job
-- A job that is not final is cancelled at $2 (its node hears of it through its watch, or heartbeat).
UPDATE jobs SET status = 'cancelled', finished_at = $2
WHERE id = $1 AND status IN ('queued', 'in_progress')
RETURNING {job_columns};

-- name: reap_leases
-- Leases that expired by $1: the job expires (past expires_at), fails when its attempts
-- are used up (the last error kept inside), or is queued again.
UPDATE jobs SET
    status = CASE WHEN expires_at IS NOT NULL AND expires_at <= $1 THEN 'expired'
                  WHEN attempts >= max_attempts THEN 'failed'
                  ELSE 'queued' END,
    error = CASE WHEN attempts >= max_attempts
                      AND NOT (expires_at IS NOT NULL AND expires_at <= $1)
                 THEN json_build_object('code', 'attempts_exhausted',
                                        'message', 'the lease expired on attempt ' || attempts
                                                   || ' of ' || max_attempts
                                                   || ' without a result',
                                        'last_error', error::json)::text
                 ELSE error END,
    finished_at = CASE WHEN (expires_at IS NOT NULL AND expires_at <= $1)
                            OR attempts >= max_attempts
                       THEN $1 ELSE NULL END,
    lease_id = NULL, lease_expires_at = NULL, node_id = NULL
WHERE seq IN (SELECT seq FROM jobs WHERE status = 'in_progress' AND lease_expires_at <= $1
              FOR UPDATE SKIP LOCKED)
RETURNING id, status;

-- name: reap_queued
-- Queued jobs whose expires_at passed by $1 expire.
UPDATE jobs SET status = 'expired', finished_at = $1
WHERE seq IN (SELECT seq FROM jobs WHERE status = 'queued' AND expires_at <= $1
              FOR UPDATE SKIP LOCKED)
RETURNING id;

-- name: watch_leases
-- A reaper pass at $1: leases are watched (the latest time of any server is kept).
INSERT INTO lease_watch (id, watched_at) VALUES (1, $1)
ON CONFLICT (id) DO UPDATE
SET watched_at = greatest(lease_watch.watched_at, excluded.watched_at);

-- name: leases_watched_at
SELECT watched_at FROM lease_watch WHERE id = 1;

-- name: resume_leases
-- After an outage: leases still live when servers last watched them at $1 (every lease
-- when $1 is NULL: never recorded) expire no sooner than $2.
UPDATE jobs SET lease_expires_at = greatest(lease_expires_at, $2)
WHERE status = 'in_progress' AND ($1::double precision IS NULL OR lease_expires_at > $1)
RETURNING id;

-- name: count_active
SELECT count(*) FROM jobs WHERE owner = $1 AND status IN ('queued', 'in_progress');

-- name: job_counts
-- Jobs per model and status: the sums of the deltas the triggers of migration 0007 keep.
SELECT model, status, sum(n) FROM job_counts GROUP BY model, status HAVING sum(n) > 0;

-- name: finished_counts
-- Jobs that completed or failed with finished_at in [$1, $2), per step of $3 seconds
-- from $1, model and status (the overview's throughput); the index jobs_finished
-- (status, finished_at) reads only the jobs of that window.
SELECT floor((finished_at - $1) / $3)::bigint AS step, model, status, count(*)
FROM jobs
WHERE status IN ('completed', 'failed') AND finished_at >= $1 AND finished_at < $2
GROUP BY step, model, status;

-- name: recent_runs
-- Per model, the jobs nodes ran that completed or failed at or after $1 (not answered
-- by the response cache): how many, their time in progress summed, the earliest start
-- and the latest finish (core/eta.py: the model's pace). The index jobs_finished
-- (status, finished_at) reads only the jobs of that window.
SELECT model, count(*), sum(finished_at - started_at), min(started_at), max(finished_at)
FROM jobs
WHERE status IN ('completed', 'failed') AND finished_at >= $1
  AND started_at IS NOT NULL AND cached = 0
GROUP BY model;

-- name: fold_job_counts
-- The deltas in job_counts folded into one row per (model, status), with each reaper
-- pass. A delta committed meanwhile is not deleted (not in this snapshot) and stays; two
-- folds at once leave the sums right too (the second skips rows the first deleted).
WITH folded AS (DELETE FROM job_counts RETURNING model, status, n)
INSERT INTO job_counts (model, status, n)
SELECT model, status, sum(n) FROM folded GROUP BY model, status HAVING sum(n) <> 0;

-- name: jobs_planned_rows
-- How many jobs there are (the counters) and how many the planner last saw (reltuples;
-- -1 before the first ANALYZE): far apart, the claim's plan may read a flood whole.
SELECT (SELECT coalesce(sum(n), 0) FROM job_counts)::float8,
       (SELECT reltuples FROM pg_class WHERE oid = 'jobs'::regclass)::float8;

-- name: models_with_queued_jobs
-- For the bridge's fallback: which of the models $1 have a queued job (an index probe).
SELECT m FROM unnest($1::text[]) AS t(m)
WHERE EXISTS (SELECT 1 FROM jobs WHERE status = 'queued' AND pin_node IS NULL AND model = t.m)
   OR EXISTS (SELECT 1 FROM jobs
              WHERE status = 'queued' AND pin_node IS NOT NULL AND model = t.m);

-- name: final_job_ids
-- For the bridge's fallback: which of the jobs $1 are final.
SELECT id FROM jobs
WHERE id = ANY($1::text[]) AND status IN ('completed', 'failed', 'cancelled', 'expired');

-- ======================================================================== nodes

-- name: upsert_node
INSERT INTO nodes ({node_columns}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
ON CONFLICT (id) DO UPDATE SET name = excluded.name, owner = excluded.owner,
    models = excluded.models, capacity = excluded.capacity, hardware = excluded.hardware,
    version = excluded.version, registered_at = excluded.registered_at,
    last_seen = excluded.last_seen, stats = excluded.stats, labels = excluded.labels;

-- name: forget_stale_namesakes
-- A node registering: rows of earlier nodes of the same key ($1) and name ($2), not seen
-- since $3 (restarts of this node), go.
DELETE FROM nodes WHERE owner = $1 AND name = $2 AND last_seen < $3;

-- name: forget_nodes
-- Rows of nodes not seen since $1 go.
DELETE FROM nodes WHERE last_seen < $1;

-- name: touch_node
UPDATE nodes SET last_seen = $1 WHERE id = $2;

-- name: touch_node_stats
UPDATE nodes SET last_seen = $1, stats = $3 WHERE id = $2;

-- name: get_node
SELECT {node_columns} FROM nodes WHERE id = $1;

-- name: list_nodes
SELECT {node_columns} FROM nodes WHERE last_seen >= $1 ORDER BY registered_at;

-- ======================================================================== keys

-- name: insert_key
INSERT INTO api_keys ({key_columns}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8);

-- name: get_key_by_hash
SELECT {key_columns} FROM api_keys WHERE key_hash = $1;

-- name: list_keys
SELECT {key_columns} FROM api_keys ORDER BY created_at, id;

-- name: revoke_key
UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL;

-- name: get_key
SELECT {key_columns} FROM api_keys WHERE id = $1;

-- name: set_key_group
-- The share group of key $1 is now $2 (NULL: none): its queued jobs count there too.
UPDATE api_keys SET share_group = $2 WHERE id = $1 RETURNING {key_columns};

-- name: put_share
INSERT INTO shares ({share_columns}) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (name) DO UPDATE SET weight = excluded.weight,
    jobs_per_hour = excluded.jobs_per_hour, tokens_per_hour = excluded.tokens_per_hour,
    updated_at = excluded.updated_at;

-- name: list_shares
SELECT {share_columns} FROM shares ORDER BY name;

-- name: delete_share
DELETE FROM shares WHERE name = $1;

-- name: add_revocations
-- Swarm revocations (key ids $1, times $2, origins $3: arrays of one length) not yet
-- known here: the ids of the new ones.
INSERT INTO swarm_revocations (key_id, revoked_at, origin)
SELECT k, t, o FROM unnest($1::text[], $2::float8[], $3::text[]) AS r(k, t, o)
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
SELECT key_id, revoked_at, origin FROM swarm_revocations WHERE key_id = $1;

-- ======================================================================== web sessions

-- name: insert_session
INSERT INTO web_sessions ({session_columns}) VALUES ($1, $2, $3, $4, $5);

-- name: get_session
SELECT {session_columns} FROM web_sessions WHERE id_hash = $1 AND expires_at > $2;

-- name: delete_session
DELETE FROM web_sessions WHERE id_hash = $1;

-- name: prune_sessions
DELETE FROM web_sessions WHERE expires_at <= $1;

-- ======================================================================== files

-- name: put_file_part
INSERT INTO file_parts (file_id, idx, data) VALUES ($1, $2, $3)
ON CONFLICT (file_id, idx) DO UPDATE SET data = excluded.data;

-- name: insert_file
INSERT INTO files (id, owner, purpose, filename, bytes, created_at, lines, expires_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
RETURNING seq;

-- name: get_file
SELECT {file_columns} FROM files WHERE id = $1;

-- name: list_files
SELECT {file_columns} FROM files WHERE {where} ORDER BY seq DESC LIMIT {limit};

-- name: read_file_part
SELECT data FROM file_parts WHERE file_id = $1 AND idx = $2;

-- name: delete_file_parts
DELETE FROM file_parts WHERE file_id = $1;

-- name: delete_file
DELETE FROM files WHERE id = $1 RETURNING id;

-- ======================================================================== batches

-- name: insert_batch
INSERT INTO batches ({batch_fields}) VALUES ({batch_marks}) RETURNING seq;

-- name: save_batch
-- Optimistic concurrency: written only if the stored version is still $2.
UPDATE batches SET {batch_sets} WHERE id = $1 AND version = $2;

-- name: get_batch
SELECT {batch_columns} FROM batches WHERE id = $1;

-- name: list_batches
SELECT {batch_columns} FROM batches WHERE {where} ORDER BY seq DESC LIMIT {limit};

-- name: open_batches
SELECT {batch_columns} FROM batches
WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling') ORDER BY seq;

-- name: batch_counts
SELECT status, count(*) FROM jobs WHERE batch_id = $1 GROUP BY status;

-- name: batch_jobs
SELECT {job_columns} FROM jobs WHERE batch_id = $1 AND seq > $2 ORDER BY seq LIMIT $3;

-- name: cancel_batch_jobs
-- The batch's queued jobs are cancelled at $2; running ones finish.
UPDATE jobs SET status = 'cancelled', finished_at = $2
WHERE batch_id = $1 AND status = 'queued'
RETURNING id;

-- ======================================================================== retention

-- name: delete_job
-- One job, when it is final (a running job's lease and result still need its row).
DELETE FROM jobs WHERE id = $1
  AND status IN ('completed', 'failed', 'cancelled', 'expired')
RETURNING id;

-- name: forget_cached_answer
-- The response cache's answer made by job $1 (its owner deleted it).
DELETE FROM response_cache WHERE job_id = $1;

-- name: prune_jobs
-- Up to $3 jobs of the final status $1 that finished before $2, oldest first. Never a
-- job that is not final, nor one of a batch still running (its output is not written).
DELETE FROM jobs WHERE seq IN (
    SELECT seq FROM jobs AS j
    WHERE j.status = $1 AND j.finished_at < $2
      AND j.status IN ('completed', 'failed', 'cancelled', 'expired')
      AND (j.batch_id IS NULL OR NOT EXISTS (
          SELECT 1 FROM batches AS b WHERE b.id = j.batch_id
          AND b.status IN ('validating', 'in_progress', 'finalizing', 'cancelling')))
    ORDER BY j.finished_at LIMIT $3
          FOR UPDATE SKIP LOCKED
);

-- name: count_prunable_jobs
-- How many jobs prune_jobs would delete for status $1 and cutoff $2 (no limit).
SELECT count(*) FROM jobs AS j
WHERE j.status = $1 AND j.finished_at < $2
  AND j.status IN ('completed', 'failed', 'cancelled', 'expired')
  AND (j.batch_id IS NULL OR NOT EXISTS (
      SELECT 1 FROM batches AS b WHERE b.id = j.batch_id
      AND b.status IN ('validating', 'in_progress', 'finalizing', 'cancelling')));

-- name: prune_batches
-- Up to $2 final batches that finished before $1 (their files follow: prune_file).
DELETE FROM batches WHERE seq IN (
    SELECT seq FROM batches
    WHERE status IN ('completed', 'failed', 'expired', 'cancelled')
      AND coalesce(completed_at, failed_at, expired_at, cancelled_at, created_at) < $1
    ORDER BY seq LIMIT $2
          FOR UPDATE SKIP LOCKED
);

-- name: count_prunable_batches
SELECT count(*) FROM batches
WHERE status IN ('completed', 'failed', 'expired', 'cancelled')
  AND coalesce(completed_at, failed_at, expired_at, cancelled_at, created_at) < $1;

-- name: prunable_files
-- Up to $3 files that may go at $1: expired, or (without an expiry) a batch's file that
-- no batch uses any more, made before $2. Never a file of a batch still running.
SELECT id FROM files AS f
WHERE (f.expires_at <= $1
       OR (f.expires_at IS NULL AND f.purpose IN ('batch', 'batch_output') AND f.created_at < $2
           AND NOT EXISTS (SELECT 1 FROM batches AS b WHERE b.input_file_id = f.id)
           AND NOT EXISTS (SELECT 1 FROM batches AS b WHERE b.output_file_id = f.id)
           AND NOT EXISTS (SELECT 1 FROM batches AS b WHERE b.error_file_id = f.id)))
  AND NOT EXISTS (
      SELECT 1 FROM batches AS b
      WHERE b.status IN ('validating', 'in_progress', 'finalizing', 'cancelling')
        AND f.id IN (b.input_file_id, b.output_file_id, b.error_file_id))
ORDER BY f.seq LIMIT $3;

-- name: prune_file
-- The file $1's record, if it still may go (as prunable_files, at $2 and $3).
DELETE FROM files AS f
WHERE f.id = $1
  AND (f.expires_at <= $2
       OR (f.expires_at IS NULL AND f.purpose IN ('batch', 'batch_output') AND f.created_at < $3
           AND NOT EXISTS (SELECT 1 FROM batches AS b WHERE b.input_file_id = f.id)
           AND NOT EXISTS (SELECT 1 FROM batches AS b WHERE b.output_file_id = f.id)
           AND NOT EXISTS (SELECT 1 FROM batches AS b WHERE b.error_file_id = f.id)))
  AND NOT EXISTS (
      SELECT 1 FROM batches AS b
      WHERE b.status IN ('validating', 'in_progress', 'finalizing', 'cancelling')
        AND f.id IN (b.input_file_id, b.output_file_id, b.error_file_id))
RETURNING id;

-- name: prune_file_parts
-- The parts of file $1 once its record is gone.
DELETE FROM file_parts
WHERE file_id = $1 AND NOT EXISTS (SELECT 1 FROM files WHERE id = $1);

-- name: owner_file_bytes
-- The bytes of every file key $1 owns (its quota counts them).
SELECT coalesce(sum(bytes), 0) FROM files WHERE owner = $1;

-- ======================================================================== templates

-- name: put_template
INSERT INTO templates ({template_columns}) VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (owner, name) DO UPDATE SET description = excluded.description,
    streams = excluded.streams, updated_at = excluded.updated_at
RETURNING {template_columns};

-- name: get_template
SELECT {template_columns} FROM templates WHERE owner = $1 AND name = $2;

-- name: list_templates
SELECT {template_columns} FROM templates WHERE {where} ORDER BY name, owner;

-- name: delete_template
DELETE FROM templates WHERE owner = $1 AND name = $2;

-- ======================================================================== rate limits

-- name: hit_counters
-- One hit of each counter named in $1, in the window starting at the same place in $2:
-- each counter's hits so far in its current window, and that window's start. A later
-- window starts over; a hit stamped with an earlier window (another server's clock)
-- counts in the current one.
INSERT INTO rate_counters (name, window_start, hits)
SELECT n, w, 1 FROM unnest($1::text[], $2::float8[]) AS t(n, w)
ON CONFLICT (name) DO UPDATE SET
    hits = CASE WHEN excluded.window_start > rate_counters.window_start THEN 1
                ELSE rate_counters.hits + 1 END,
    window_start = greatest(rate_counters.window_start, excluded.window_start)
RETURNING name, hits, window_start;

-- name: add_counters
-- Add $3 to each counter named in $1, in the window starting at the same place in $2
-- (quotas: core/quotas.py): each counter's total in its current window (never below 0)
-- and that window's start. A later window starts over at the amount; an amount stamped
-- with an earlier window than the counter's is dropped (that window is over).
WITH t AS (SELECT n, w, a FROM unnest($1::text[], $2::float8[], $3::bigint[]) AS t(n, w, a))
INSERT INTO rate_counters (name, window_start, hits)
SELECT n, w, greatest(a, 0) FROM t
ON CONFLICT (name) DO UPDATE SET
    hits = CASE WHEN excluded.window_start > rate_counters.window_start THEN excluded.hits
                WHEN excluded.window_start < rate_counters.window_start THEN rate_counters.hits
                ELSE greatest(rate_counters.hits + (SELECT a FROM t WHERE t.n = excluded.name), 0)
           END,
    window_start = greatest(rate_counters.window_start, excluded.window_start)
RETURNING name, hits, window_start;

-- ======================================================================== response cache

-- name: cache_lookup
-- The answers kept under the keys $1, made at or after $2 (older ones expired; the
-- reaper deletes them).
SELECT key, result FROM response_cache WHERE key = ANY($1::text[]) AND created_at >= $2;

-- name: cache_used
-- Hits counted by a server since its last pass: $1 keys, $2 how many hits each
-- (pairwise), last used at $3.
UPDATE response_cache SET hits = hits + u.n, used_at = greatest(used_at, $3)
FROM unnest($1::text[], $2::bigint[]) AS u(key, n)
WHERE response_cache.key = u.key;

-- name: cache_expire
-- Up to $2 answers made before $1.
DELETE FROM response_cache
WHERE key IN (SELECT key FROM response_cache WHERE created_at < $1 LIMIT $2);

-- name: cache_summary
SELECT count(*), coalesce(sum(bytes), 0), coalesce(sum(hits), 0) FROM response_cache;

-- name: cache_oldest_used
-- The least recently used answers, $1 of them: what eviction takes first.
SELECT key, bytes FROM response_cache ORDER BY used_at, key LIMIT $1;

-- name: cache_delete
-- The answers under the keys $1.
DELETE FROM response_cache WHERE key = ANY($1::text[]);

-- name: cache_clear
-- Every answer, or those of model $1.
DELETE FROM response_cache WHERE $1::text IS NULL OR model = $1;
