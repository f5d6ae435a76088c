-- Retention: files may expire (OpenAI's expires_after, or the default of their purpose),
-- and the pruner walks final jobs by status and finishing time.
ALTER TABLE files ADD COLUMN expires_at REAL;
CREATE INDEX files_expiry ON files (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX jobs_finished ON jobs (status, finished_at) WHERE finished_at IS NOT NULL;
-- Which batches use a file (a file of a running batch is never pruned).
CREATE INDEX batches_input ON batches (input_file_id);
CREATE INDEX batches_output ON batches (output_file_id) WHERE output_file_id IS NOT NULL;
CREATE INDEX batches_error ON batches (error_file_id) WHERE error_file_id IS NOT NULL;
