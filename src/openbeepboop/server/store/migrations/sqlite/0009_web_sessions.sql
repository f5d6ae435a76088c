-- Logins of the web interface: a session cookie's SHA-256 (never the cookie), the hash of
-- the API key it logged in with (a revoked key ends its sessions), the CSRF token its
-- forms carry, and when it expires (expired rows are deleted at the next login).
CREATE TABLE web_sessions (
    id_hash    TEXT PRIMARY KEY,
    key_hash   TEXT NOT NULL,
    csrf       TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX web_sessions_expiry ON web_sessions (expires_at);
