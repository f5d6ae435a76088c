-- Pinning a job to a node: `pin_node` (a node's name or id) and `pin_labels` (a JSON
-- object of string labels, every one of which the node must carry); NULL when the job
-- is not pinned. The claim (sql/sqlite.sql: claim_candidates) filters on them as it
-- walks jobs_queued, so unpinned work is claimed as before. A node's labels come from
-- its config and are sent when it registers.
ALTER TABLE jobs ADD COLUMN pin_node TEXT;
ALTER TABLE jobs ADD COLUMN pin_labels TEXT;
ALTER TABLE nodes ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
