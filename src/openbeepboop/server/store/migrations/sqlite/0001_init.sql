-- Jobs: one row per request. seq orders by age and pages listings.
CREATE TABLE jobs (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT    NOT NULL UNIQUE,
    owner            TEXT    NOT NULL,
    endpoint         TEXT    NOT NULL,
    model            TEXT    NOT NULL,
    request          TEXT    NOT NULL,
    request_hash     TEXT    NOT NULL,
    status           TEXT    NOT NULL,
    priority         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    metadata         TEXT,
    custom_id        TEXT,
    idempotency_key  TEXT,
    created_at       REAL    NOT NULL,
    expires_at       REAL,
    started_at       REAL,
    finished_at      REAL,
    lease_id         TEXT,
    lease_expires_at REAL,
    node_id          TEXT,
    result           TEXT,
    error            TEXT
);

-- The claim walks this index: queued jobs of one model, highest priority, oldest first.
CREATE INDEX jobs_queued ON jobs (model, priority DESC, seq) WHERE status = 'queued';
-- The reaper walks running leases by expiry.
CREATE INDEX jobs_leases ON jobs (lease_expires_at) WHERE status = 'in_progress';
CREATE INDEX jobs_expiry ON jobs (expires_at) WHERE status = 'queued' AND expires_at IS NOT NULL;
CREATE INDEX jobs_lease_id ON jobs (lease_id) WHERE lease_id IS NOT NULL;
CREATE INDEX jobs_owner ON jobs (owner, seq);
CREATE INDEX jobs_owner_active ON jobs (owner) WHERE status IN ('queued', 'in_progress');
CREATE UNIQUE INDEX jobs_idempotency ON jobs (owner, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE TABLE api_keys (
    id         TEXT PRIMARY KEY,
    role       TEXT NOT NULL,
    key_hash   TEXT NOT NULL UNIQUE,
    prefix     TEXT NOT NULL,
    name       TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    revoked_at REAL
);

CREATE TABLE nodes (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    owner         TEXT NOT NULL,
    models        TEXT NOT NULL,
    capacity      INTEGER NOT NULL,
    hardware      TEXT NOT NULL,
    version       TEXT NOT NULL,
    registered_at REAL NOT NULL,
    last_seen     REAL NOT NULL,
    stats         TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX nodes_last_seen ON nodes (last_seen);
