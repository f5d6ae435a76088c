"""Inbound: the request bodies the HTTP API accepts, validated with pydantic (what
comes in; outbound.py is what goes out).

OpenAI request bodies keep every field the client sent (extra fields are allowed and
passed to the node untouched); only the fields we act on are checked.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Fields of ours that ride in an OpenAI body (the SDK's `extra_body`); they are taken
# out before the body is stored for the node.
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit of inputs in one embeddings request
OUR_FIELDS = (
    "priority",
    "max_attempts",
    "expires_at",
    "ttl_seconds",
    "metadata",
    "custom_id",
    "node",
    "node_labels",
    "cache",
)
# A node label (config `[node] labels`, a job's `node_labels`): short strings both sides.
LabelName = Annotated[str, Field(min_length=1, max_length=64)]
LabelValue = Annotated[str, Field(max_length=256)]
NodeName = Annotated[str, Field(min_length=1, max_length=256)]
Labels = dict[LabelName, LabelValue]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Knobs(BaseModel):
    """Our options on a job, beside the OpenAI body."""

    priority: int = Field(0, ge=-1000, le=1000, description="Higher runs first.")
    max_attempts: int | None = Field(None, ge=1, le=100, description="Fetches before failing.")
    # Upper bounds keep the times finite and within 64 bits: the store and the wire need it.
    expires_at: float | None = Field(
        None, gt=0, le=1e11, description="Unix time after which it expires."
    )
    ttl_seconds: float | None = Field(
        None, gt=0, le=1e9, description="Expire this long after submit."
    )
    metadata: dict[str, Any] | None = Field(None, description="Your labels, returned as given.")
    custom_id: str | None = Field(None, max_length=512, description="Your id for this request.")
    node: NodeName | None = Field(
        None, description="Run only on the node of this name (or id); it waits for that node."
    )
    node_labels: Labels | None = Field(
        None, max_length=32, description="Run only on a node carrying all these labels."
    )
    cache: Literal["use", "skip", "refresh"] | None = Field(
        None,
        description="Response cache: look up and keep (use), neither (skip), or run "
        "and keep the new answer (refresh); unset: the server's policy (docs/cache.md).",
    )


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None


class _SamplingParams(_Open):
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1, le=128)
    stream: bool | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)


class ChatCompletionBody(_SamplingParams, Knobs):
    """`POST /v1/chat/completions`: OpenAI's body plus our knobs."""

    model: str = Field(min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionBody(_SamplingParams, Knobs):
    """`POST /v1/completions`: OpenAI's body plus our knobs."""

    model: str = Field(min_length=1, max_length=256)
    prompt: str | list[str] | list[int] | list[list[int]]


class EmbeddingBody(_Open, Knobs):
    """`POST /v1/embeddings`: OpenAI's body plus our knobs."""

    model: str = Field(min_length=1, max_length=256)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        # as OpenAI: no empty input, at most MAX_EMBEDDING_INPUTS items
        if isinstance(value, list) and not value:
            raise ValueError("input must not be an empty list")
        if isinstance(value, list) and len(value) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"input holds at most {MAX_EMBEDDING_INPUTS} items")
        if value == "" or (isinstance(value, list) and any(v in ("", []) for v in value)):
            raise ValueError("input must not hold an empty string or token array")
        return value


# The body each OpenAI endpoint of ours takes (for jobs and batch lines too).
ENDPOINT_BODIES: dict[str, type[Knobs]] = {
    "/v1/chat/completions": ChatCompletionBody,
    "/v1/completions": CompletionBody,
    "/v1/embeddings": EmbeddingBody,
}


class JobSpec(Knobs):
    """One job for `POST /v1/jobs`. `url` and `body` are the names of OpenAI batch lines."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"] = Field(
        "/v1/chat/completions", alias="url"
    )
    body: dict[str, Any] | None = Field(
        None, description="The OpenAI request body (or give `template` and `query`)."
    )
    method: Literal["POST"] | None = None
    idempotency_key: str | None = Field(None, min_length=1, max_length=255)
    template: str | None = Field(
        None, max_length=64, description="A stored assistant template to render instead."
    )
    query: str | None = Field(None, description="With `template`: replaces `{query}`.")
    history: list[dict[str, Any]] | None = Field(
        None, description='With `template`: messages for `{"insert": "history"}`.'
    )


class JobBatch(_Closed):
    """Several jobs for `POST /v1/jobs`, queued all or none."""

    jobs: list[JobSpec] = Field(min_length=1)


class PollBody(_Closed):
    ids: list[str] = Field(min_length=1, max_length=10_000)
    wait: float = Field(0, ge=0, description="Seconds to hold the answer until one is final.")
    only_final: bool = Field(False, description="Return only the jobs that are final.")


# -- node protocol ---------------------------------------------------------------


class NodeModel(_Open):
    name: str = Field(min_length=1, max_length=256)
    state: str = "ready"


class RegisterBody(_Open):
    name: str = Field("", max_length=256)
    labels: Labels = Field(default_factory=dict, max_length=32)
    models: list[NodeModel] = Field(default_factory=list)
    capacity: int = Field(1, ge=1, le=100_000)
    hardware: dict[str, Any] = Field(default_factory=dict)
    version: str = Field("", max_length=64)


class FetchBody(_Open):
    node_id: str = Field(min_length=1)
    models: list[str] = Field(min_length=1, max_length=1000)
    max_jobs: int = Field(1, ge=1, le=1000)
    wait: float = Field(0, ge=0)
    loaded: dict[str, float] = Field(
        default_factory=dict,
        max_length=1000,
        description="Models the node has loaded now, each with the seconds it has held it.",
    )


class DemandBody(_Open):
    node_id: str = Field(min_length=1)
    prefixes: list[str] = Field(min_length=1, max_length=100)


class HeartbeatBody(_Open):
    node_id: str = Field(min_length=1)
    lease_ids: list[str] = Field(default_factory=list, max_length=100_000)
    stats: dict[str, Any] = Field(default_factory=dict)


class WatchedLease(_Open):
    job_id: str = Field(min_length=1)
    lease_id: str = Field(min_length=1)


class WatchBody(_Open):
    """`/internal/queue/watch`: the running jobs to watch for a cancel, and how long."""

    node_id: str = Field(min_length=1)
    leases: list[WatchedLease] = Field(max_length=100_000)
    wait: float = Field(0, ge=0)


class NodeError(_Open):
    message: str = ""
    code: str = "node_error"
    retryable: bool = False


class ResultItem(_Open):
    job_id: str = Field(min_length=1)
    lease_id: str = Field(min_length=1)
    result: dict[str, Any] | None = None
    error: NodeError | None = None


class DeltaEvent(_Open):
    """One piece of a running job: text of choice 0 (`delta`), or OpenAI chunk choices
    (`choices`) for the rest; a node sends both (`delta` then holds choice 0's text of
    the piece, for servers that know only text)."""

    job_id: str = Field(min_length=1)
    lease_id: str = Field(min_length=1)
    index: int = Field(ge=0)
    delta: str = ""
    choices: list[dict[str, Any]] | None = Field(None, max_length=128)
    progress: dict[str, Any] | None = None


class EventsBody(_Open):
    node_id: str | None = None
    events: list[DeltaEvent] = Field(max_length=100_000)


class SubmitResultsBody(_Open):
    node_id: str | None = None
    results: list[ResultItem] = Field(min_length=1, max_length=10_000)


class ResponsesBody(_Open):
    """`POST /v1/responses`: OpenAI's Responses request (run as a chat-completion job)."""

    model: str = Field(min_length=1, max_length=256)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = Field(None, min_length=1, max_length=64)
    store: bool = True
    stream: bool = False
    background: bool = False
    metadata: dict[str, str] | None = Field(None, max_length=16)
    text: dict[str, Any] | None = None
    user: str | None = None
    seed: int | None = None
    cache: Literal["use", "skip", "refresh"] | None = None  # the response cache (Knobs)
    node: NodeName | None = None  # a pin, as on the other endpoints (Knobs)
    node_labels: Labels | None = Field(None, max_length=32)
