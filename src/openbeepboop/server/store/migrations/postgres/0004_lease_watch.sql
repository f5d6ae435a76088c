-- When a server last watched the leases (its reaper's last pass), so that a server
-- starting after the whole deployment was down can tell how long leases went unwatched
-- (Queue.resume_leases). One row, written by every reaper pass of every replica; none
-- until the first.
CREATE TABLE lease_watch (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    watched_at DOUBLE PRECISION NOT NULL
);
