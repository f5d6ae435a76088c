-- Named assistant templates: streams of provider + settings + messages, per owner.
CREATE TABLE templates (
    owner       TEXT NOT NULL,
    name        TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    streams     TEXT NOT NULL,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    PRIMARY KEY (owner, name)
);
