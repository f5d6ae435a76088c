-- Fair share (docs/scheduling.md): within one priority, the claim serves the shares that
-- have queued jobs of a model in weighted turn (start-time fair queueing), instead of
-- the oldest job first. A job's share is its key's group, or the key itself.
--
-- api_keys.share_group: the group a key's jobs are counted in (NULL: the key alone).
-- shares: what an admin set for a share (a group's name or a key's id): its weight
-- (a share of weight 2 is served twice as often as one of weight 1 while both wait) and
-- optional quotas. A share with no row has weight 1 and no quota.
-- fair_turns: per model and share, the virtual time at which the share's next job may
-- start (`finish`); the row with share '' is the model's clock, the start of the latest
-- job leased. A share idle for a while starts again at the clock: no credit piles up.
-- jobs_queued_owner: the claim walks the distinct owners with queued jobs of a model
-- (one index seek each) and the first jobs of each, however long the queue.
ALTER TABLE api_keys ADD COLUMN share_group TEXT;

CREATE TABLE shares (
    name            TEXT PRIMARY KEY,
    weight          REAL NOT NULL DEFAULT 1,
    jobs_per_hour   INTEGER,
    tokens_per_hour INTEGER,
    updated_at      REAL NOT NULL
);

CREATE TABLE fair_turns (
    model  TEXT NOT NULL,
    share  TEXT NOT NULL,
    finish REAL NOT NULL,
    PRIMARY KEY (model, share)
);

CREATE INDEX jobs_queued_owner ON jobs (model, owner, priority DESC, seq)
    WHERE status = 'queued' AND pin_node IS NULL;
