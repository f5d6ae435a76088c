"""The LangChain and LiteLLM recipes of docs/recipes.md, as written there, against a real
server and an echo node (it answers with the last user message, so each answer is known):
`ChatOpenAI(base_url=...)` invoke, stream and batch; `litellm.completion(model="openai/...",
api_base=...)` plain and streamed. One server and one node serve the module."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProcess
from tests.nodes import SERVER_LOG_WARNING, echo_model, new_server, with_node
from tests.test_third_party_clients import a_loop_for_litellm

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings(SERVER_LOG_WARNING)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("recipes")
    server = new_server(tmp / "server")
    try:
        with with_node(server, tmp / "node", [echo_model(token_delay_ms=1)]):
            yield server
    finally:
        server.kill(signal.SIGTERM)


def echo_jobs(server: ServerProcess) -> list[dict[str, Any]]:
    r = httpx.get(
        f"{server.url}/v1/jobs?model=echo&limit=100",
        headers={"Authorization": f"Bearer {server.keys['client_key']}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    return list(r.json()["data"])


def test_langchain_invoke_stream_batch(server: ServerProcess) -> None:
    from langchain_openai import ChatOpenAI

    before = len(echo_jobs(server))
    chat = ChatOpenAI(
        model="echo",
        base_url=server.url + "/v1",
        api_key=server.keys["client_key"],  # type: ignore[arg-type]
        max_retries=0,
    )
    assert chat.invoke("Queues are patient").content == "Queues are patient"

    pieces = [chunk.content for chunk in chat.stream("one two three four")]
    assert len([p for p in pieces if p]) >= 2, pieces  # streamed, not one lump
    assert "".join(str(p) for p in pieces) == "one two three four"

    prompts = ["first prompt", "second prompt", "third prompt"]
    answers = chat.batch(prompts)
    assert [a.content for a in answers] == prompts
    assert len(echo_jobs(server)) == before + 5  # each call was a job on the server


def test_litellm_completion_and_stream(
    server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch at import
    import litellm

    target = {"api_base": server.url + "/v1", "api_key": server.keys["client_key"]}
    messages = [{"role": "user", "content": "Hello from LiteLLM"}]
    with a_loop_for_litellm():
        answer: Any = litellm.completion(
            model="openai/echo", messages=messages, num_retries=0, **target
        )
        chunks = list(
            litellm.completion(
                model="openai/echo",
                messages=[{"role": "user", "content": "streamed words come back"}],
                stream=True,
                num_retries=0,
                **target,
            )
        )
    assert answer.choices[0].message.content == "Hello from LiteLLM"
    assert answer.usage.completion_tokens > 0
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "streamed words come back"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2
