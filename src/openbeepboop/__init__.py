"""OpenBeepBoop: submit LLM jobs now, collect them later.

from openbeepboop import Client
client = Client(base_url="http://127.0.0.1:8000", api_key="obb_client_...")
job = client.chat.completions.create(model="gemma-3-270m", messages=[...])
print(job.get(wait=True).choices[0].message.content)
"""

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# the client and its typed errors, reachable from the package root
# (`from openbeepboop import Client, JobFailedError`): what `openbeepboop.client` exports
__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "AsyncClient",
    "AsyncJob",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "Job",
    "JobFailedError",
    "JobTimeoutError",
    "NotFoundError",
    "OpenBeepBoopError",
    "PermissionDeniedError",
    "RateLimitError",
    "RunAbortedError",
    "RunOutcome",
    "RunResult",
    "ServerError",
    "StreamInterruptedError",
    "__version__",
]

if TYPE_CHECKING:
    from openbeepboop.client import (
        APIConnectionError,
        APIStatusError,
        AsyncClient,
        AsyncJob,
        AuthenticationError,
        BadRequestError,
        Client,
        Job,
        JobFailedError,
        JobTimeoutError,
        NotFoundError,
        OpenBeepBoopError,
        PermissionDeniedError,
        RateLimitError,
        RunAbortedError,
        RunOutcome,
        RunResult,
        ServerError,
        StreamInterruptedError,
    )


def __getattr__(name: str) -> Any:
    # the client loads only when asked for: the server and node never import it
    if name in __all__:
        from openbeepboop import client

        return getattr(client, name)
    raise AttributeError(f"module 'openbeepboop' has no attribute {name!r}")
