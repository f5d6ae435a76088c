"""Assistant templates (the LLM Worker's): streams of `provider` + `settings` + `messages`,
rendered with a query and a history into ordinary chat jobs.

- Messages may hold `{"insert": "history"}` (replaced by the history's messages) and the
  text `{query}` inside any string content (replaced by the query).
- Several streams are fallbacks, tried in order: the job runs on the first stream whose
  model a live node serves (the first stream when none is served yet); if that job
  fails, a follower that asked for fallbacks (the WebSocket) submits the next stream.
- `provider` and `settings.model` name a model the way nodes serve it: the node model
  named `<provider>/<model>` when one is served (LiteLLM's spelling, e.g.
  `openai/gpt-4o-mini`), else the one named `<model>`. Other settings (temperature,
  max_tokens, ...) go into the request body as they are.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from typing import Any

from openbeepboop.server.core.queue import Queue
from openbeepboop.server.errors import InvalidRequest, NotFound
from openbeepboop.server.models import JSON, ApiKey, Role, Template
from openbeepboop.server.store.base import Store

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_STREAMS = 8
ROLES = ("system", "developer", "user", "assistant", "tool")


def check_streams(streams: Any, param: str = "streams") -> list[JSON]:
    """The streams of a template, checked; InvalidRequest naming what is wrong."""
    if not isinstance(streams, list) or not streams:
        raise InvalidRequest(f"'{param}' must be a non-empty list of streams", param=param)
    if len(streams) > MAX_STREAMS:
        raise InvalidRequest(f"at most {MAX_STREAMS} streams", param=param)
    for i, stream in enumerate(streams):
        where = f"{param}[{i}]"
        if not isinstance(stream, dict):
            raise InvalidRequest(f"{where} must be an object", param=where)
        settings = stream.get("settings")
        if not isinstance(settings, dict) or not isinstance(settings.get("model"), str):
            raise InvalidRequest(
                f"{where}.settings.model must be a string (the model to run)",
                param=f"{where}.settings.model",
            )
        if not isinstance(stream.get("provider", ""), str):
            raise InvalidRequest(f"{where}.provider must be a string", param=f"{where}.provider")
        messages = stream.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest(
                f"{where}.messages must be a non-empty list", param=f"{where}.messages"
            )
        for j, message in enumerate(messages):
            _check_message(message, f"{where}.messages[{j}]", template=True)
    return streams


def check_history(history: Any) -> list[JSON]:
    if history is None:
        return []
    if not isinstance(history, list):
        raise InvalidRequest("'history' must be a list of messages", param="history")
    for j, message in enumerate(history):
        _check_message(message, f"history[{j}]", template=False)
    return history


def _check_message(message: Any, where: str, template: bool) -> None:
    if template and isinstance(message, dict) and "insert" in message:
        if message["insert"] != "history":
            raise InvalidRequest(f'{where}: only {{"insert": "history"}} is known', param=where)
        return
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise InvalidRequest(
            f"{where} must be a message with a role ({', '.join(ROLES)}) and content",
            param=where,
        )
    if not isinstance(message.get("content"), str | list):
        raise InvalidRequest(f"{where}.content must be a string or a list", param=where)


def render_messages(messages: Sequence[JSON], query: str, history: Sequence[JSON]) -> list[JSON]:
    """The template's messages with the history inserted and `{query}` substituted."""
    out: list[JSON] = []
    for message in messages:
        if message.get("insert") == "history":
            out.extend(dict(m) for m in history)
            continue
        content = message.get("content")
        if isinstance(content, str):
            content = content.replace("{query}", query)
        out.append({**message, "content": content})
    return out


def model_name(stream: JSON, served: Sequence[str] | set[str]) -> str:
    """The node model a stream means: `<provider>/<model>` when served, else `<model>`."""
    model = str(stream["settings"]["model"])
    provider = str(stream.get("provider") or "")
    spelled = f"{provider}/{model}"
    return spelled if provider and spelled in served else model


def render_body(stream: JSON, query: str, history: Sequence[JSON], served: set[str]) -> JSON:
    """The chat request one stream makes."""
    settings = {k: v for k, v in stream["settings"].items() if k != "model"}
    return {
        **settings,
        "model": model_name(stream, served),
        "messages": render_messages(stream["messages"], query, history),
    }


class Assistants:
    """Templates a key owns (an admin key sees everyone's), and turning them into jobs."""

    def __init__(self, store: Store, queue: Queue, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.queue = queue
        self._clock = clock

    async def put(self, key: ApiKey, name: str, streams: Any, description: str = "") -> Template:
        if not NAME.match(name):
            raise InvalidRequest(
                "a template name is 1-64 letters, digits, '.', '_' or '-'", param="name"
            )
        now = self._clock()
        template = Template(key.id, name, check_streams(streams), now, now, description)
        return await self.store.put_template(template)

    async def get(self, key: ApiKey, name: str) -> Template:
        return await self.named(key.id, name, admin=key.role is Role.ADMIN)

    async def named(self, owner: str, name: str, admin: bool = False) -> Template:
        """The owner's template `name` (with `admin`, anyone's); NotFound otherwise."""
        found = await self.store.get_template(owner, name)
        if found is None and admin:
            found = next((t for t in await self.store.list_templates(None) if t.name == name), None)
        if found is None:
            raise NotFound(
                f"no template named {name!r}", param="template", code="template_not_found"
            )
        return found

    async def list_templates(self, key: ApiKey) -> list[Template]:
        return await self.store.list_templates(None if key.role is Role.ADMIN else key.id)

    async def delete(self, key: ApiKey, name: str) -> Template:
        found = await self.get(key, name)
        await self.store.delete_template(found.owner, found.name)
        return found

    async def streams_of(self, key: ApiKey, assistant: Any) -> list[JSON]:
        """An `assistant` as given: inline `{"streams": [...]}`, a template name, or
        `{"template": name}`."""
        if isinstance(assistant, str):
            return (await self.get(key, assistant)).streams
        if isinstance(assistant, dict) and isinstance(assistant.get("template"), str):
            return (await self.get(key, assistant["template"])).streams
        if isinstance(assistant, dict) and "streams" in assistant:
            return check_streams(assistant["streams"], "assistant.streams")
        raise InvalidRequest(
            '\'assistant\' must be {"streams": [...]}, a template name or {"template": name}',
            param="assistant",
        )

    async def body_for_line(self, owner: str, line: JSON) -> JSON:
        """A batch line's `{"template", "query", "history"}` body, rendered for `owner`."""
        template = await self.named(owner, str(line["template"]))
        bodies = await self.bodies(
            template.streams, str(line.get("query", "")), line.get("history")
        )
        extra = {k: v for k, v in line.items() if k not in ("template", "query", "history")}
        return {**bodies[0], **extra}

    async def bodies(self, streams: Sequence[JSON], query: str, history: Any) -> list[JSON]:
        """One chat body per stream, the preferred one first: streams whose model a live
        node serves keep their order ahead of those not served now."""
        turns = check_history(history)
        served = set(await self.queue.served_models())
        bodies = [render_body(s, query, turns, served) for s in streams]
        return sorted(bodies, key=lambda body: body["model"] not in served)
