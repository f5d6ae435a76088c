-- Swarm keys revoked on any member of the swarm (docs/security.md, "Keys across a swarm"):
-- the key's id, when it was revoked, and the server id of the member that revoked it.
-- Members gossip this list; a key listed here is refused even before this server sees it.
CREATE TABLE swarm_revocations (
    key_id     TEXT PRIMARY KEY,
    revoked_at DOUBLE PRECISION NOT NULL,
    origin     TEXT NOT NULL DEFAULT ''
);
