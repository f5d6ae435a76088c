"""The topics of wake-ups, shared by the server's notifier and the bridge that carries
them between servers: `model:<name>` (jobs for that model were queued), `job:<id>` (the
job started or reached a final state), `nodes` (the set of live nodes changed), and
`model:*` (wake every fetch, whatever its models)."""

from __future__ import annotations

MODEL_PREFIX = "model:"
JOB_PREFIX = "job:"
ALL_MODELS = MODEL_PREFIX + "*"
NODES_TOPIC = "nodes"


def model_topic(model: str) -> str:
    """Published when jobs for `model` are queued."""
    return MODEL_PREFIX + model


def job_topic(job_id: str) -> str:
    """Published when the job starts and when it reaches a final state."""
    return JOB_PREFIX + job_id
