"""DSPy on OpenBeepBoop (docs/recipes.md): a DSPy language model whose calls are jobs,
and an adapter that reads small models' sloppy answers.

    import dspy
    from openbeepboop.integrations.dspy import TolerantChatAdapter, jobs_lm

    lm = jobs_lm("gemma-3-270m", base_url="http://127.0.0.1:8000", run="eval-v3")
    dspy.configure(lm=lm, adapter=TolerantChatAdapter())

Importing this package imports dspy (the `dspy` extra); `import openbeepboop` does not.
"""

from openbeepboop.integrations.dspy.jobs import AsyncJobsEngine, JobsEngine, jobs_lm
from openbeepboop.integrations.dspy.tolerant import TolerantChatAdapter, tolerant_parse
from openbeepboop.integrations.dspy.wire import JobOptions, chat_body, idempotency_key

__all__ = [
    "AsyncJobsEngine",
    "JobOptions",
    "JobsEngine",
    "TolerantChatAdapter",
    "chat_body",
    "idempotency_key",
    "jobs_lm",
    "tolerant_parse",
]
