-- The Batch API: files (records plus their bytes in parts), batches, and jobs that
-- belong to a batch.
ALTER TABLE jobs ADD COLUMN batch_id TEXT;
CREATE INDEX jobs_batch ON jobs (batch_id, seq) WHERE batch_id IS NOT NULL;

CREATE TABLE files (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT    NOT NULL UNIQUE,
    owner      TEXT    NOT NULL,
    purpose    TEXT    NOT NULL,
    filename   TEXT    NOT NULL,
    bytes      INTEGER NOT NULL,
    lines      INTEGER NOT NULL DEFAULT 0,
    created_at REAL    NOT NULL
);
CREATE INDEX files_owner ON files (owner, seq);

CREATE TABLE file_parts (
    file_id TEXT    NOT NULL,
    idx     INTEGER NOT NULL,
    data    BLOB    NOT NULL,
    PRIMARY KEY (file_id, idx)
);

CREATE TABLE batches (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    id                TEXT    NOT NULL UNIQUE,
    owner             TEXT    NOT NULL,
    endpoint          TEXT    NOT NULL,
    input_file_id     TEXT    NOT NULL,
    completion_window TEXT    NOT NULL,
    status            TEXT    NOT NULL,
    created_at        REAL    NOT NULL,
    expires_at        REAL    NOT NULL,
    metadata          TEXT,
    errors            TEXT,
    output_file_id    TEXT,
    error_file_id     TEXT,
    request_counts    TEXT,
    usage             TEXT,
    lines_queued      INTEGER NOT NULL DEFAULT 0,
    in_progress_at    REAL,
    finalizing_at     REAL,
    completed_at      REAL,
    failed_at         REAL,
    expired_at        REAL,
    cancelling_at     REAL,
    cancelled_at      REAL,
    lease_until       REAL    NOT NULL DEFAULT 0,
    version           INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX batches_owner ON batches (owner, seq);
CREATE INDEX batches_open ON batches (seq)
    WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling');
