-- Pinning a job to a node: `pin_node` (a node's name or id) and `pin_labels` (a JSON
-- object of string labels, every one of which the node must carry); NULL when the job
-- is not pinned.
--
-- The claim walks two indexes per model: jobs_queued, now only the jobs not pinned to a
-- node (label pins are filtered as it walks), and jobs_queued_node, keyed by the node a
-- job is pinned to, which the claim probes with its own id and name. So jobs pinned to a
-- node that is away (they wait for it) are never walked by the claims of other nodes:
-- a claim costs the same however many of them wait. Each queued job is in exactly one
-- of the two: no index more to write per job.
ALTER TABLE jobs ADD COLUMN pin_node TEXT;
ALTER TABLE jobs ADD COLUMN pin_labels TEXT;
ALTER TABLE nodes ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';

DROP INDEX jobs_queued;
CREATE INDEX jobs_queued ON jobs (model, priority DESC, seq)
    WHERE status = 'queued' AND pin_node IS NULL;
CREATE INDEX jobs_queued_node ON jobs (model, pin_node, priority DESC, seq)
    WHERE status = 'queued' AND pin_node IS NOT NULL;
