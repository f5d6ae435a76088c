"""The node's `litellm` backend against a local OpenAI-compatible mock: real processes
(server, mock, node), real LiteLLM, real HTTP.

Covers answers on both endpoints and embeddings, retries of transient provider errors (429 with
Retry-After, 500), permanent errors failing the job at once, `rpm` pacing, and
`api_key_env`. Importing LiteLLM takes seconds, so one server and one node serve the
whole module; each model of the node talks to its own mock, and every test starts
with its mock reset.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import ServerProcess
from tests.nodes import (
    SERVER_LOG_WARNING,
    MockOpenAI,
    Proc,
    Procs,
    answer,
    gaps,
    log_events,
    new_server,
    node_id_of,
    start_node,
    submit_chat,
    submit_completion,
    wait_jobs,
    write_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings(SERVER_LOG_WARNING)]

PROVIDER_KEY = "sk-mock-provider-key"
ENV_KEY = "sk-from-the-environment"
RPM_K = 3  # the paced model: rpm = 60 * k, one request every 1/k s


@dataclass
class Rig:
    server: ServerProcess
    node: Proc
    main: MockOpenAI  # model "mock-gpt"
    paced: MockOpenAI  # model "mock-paced" (rpm)
    keyed: MockOpenAI  # model "mock-env" (api_key_env; the mock checks the key)
    procs: Procs
    tmp: Path


def litellm_model(name: str, mock: MockOpenAI, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "backend": "litellm",
        "model": "openai/mock-upstream",
        "api_base": mock.url + "/v1",
        "api_key": PROVIDER_KEY,
        "concurrency": 1,
        "max_attempts": 5,
        "timeout_seconds": 30,
        **extra,
    }


@pytest.fixture(scope="module")
def module_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("litellm")
    procs = Procs()
    server = new_server(tmp / "server")
    try:
        main = MockOpenAI(procs, tmp / "main")
        paced = MockOpenAI(procs, tmp / "paced")
        keyed = MockOpenAI(procs, tmp / "keyed", "--require-key", ENV_KEY)
        keyed_model = litellm_model("mock-env", keyed, api_key_env="MOCK_PROVIDER_KEY")
        del keyed_model["api_key"]
        models = [
            litellm_model("mock-gpt", main),
            litellm_model("mock-paced", paced, rpm=60 * RPM_K, concurrency=4),
            keyed_model,
        ]
        config = write_config(tmp / "node" / "node.toml", server, models)
        node = start_node(procs, config, MOCK_PROVIDER_KEY=ENV_KEY)
        node_id_of(node, timeout=60)  # LiteLLM is slow to import
        yield Rig(server, node, main, paced, keyed, procs, tmp)
    finally:
        procs.close()
        server.kill(signal.SIGTERM)


@pytest.fixture
def rig(module_rig: Rig) -> Rig:
    assert module_rig.node.alive(), module_rig.node.stderr()
    for mock in (module_rig.main, module_rig.paced, module_rig.keyed):
        mock.control(fail=[], always=None, retry_after=None, reset_requests=None, reset=True)
    return module_rig


def model_requests(mock: MockOpenAI) -> list[dict[str, Any]]:
    return [r for r in mock.requests() if r["path"].endswith("completions")]


def test_chat_and_completion_get_the_mock_answer(rig: Rig) -> None:
    chat = submit_chat(rig.server, "a chat question about zebras", "mock-gpt", temperature=0.5)
    text = submit_completion(rig.server, "a completion prompt about yaks", "mock-gpt")
    done = {j["id"]: j for j in wait_jobs(rig.server, [chat, text], "completed", timeout=30)}

    assert answer(done[chat]) == "a chat question about zebras"
    assert done[chat]["result"]["object"] == "chat.completion"
    assert done[chat]["result"]["model"] == "mock-gpt"
    assert done[chat]["result"]["usage"]["completion_tokens"] > 0
    assert answer(done[text]) == "a completion prompt about yaks"
    assert done[text]["result"]["object"] == "text_completion"

    seen = {r["path"]: r for r in model_requests(rig.main)}
    assert set(seen) == {"/v1/chat/completions", "/v1/completions"}
    chat_body = seen["/v1/chat/completions"]["body"]
    assert chat_body["stream"] is True
    assert chat_body["temperature"] == 0.5
    assert chat_body["model"] == "mock-upstream"
    assert seen["/v1/completions"]["body"]["prompt"] == "a completion prompt about yaks"
    assert all(r["authorization"] == f"Bearer {PROVIDER_KEY}" for r in seen.values())
    logs = rig.node.stdout() + rig.node.stderr()
    assert "zebras" not in logs and "yaks" not in logs and PROVIDER_KEY not in logs


def test_embeddings_through_litellm(rig: Rig) -> None:
    with openai.OpenAI(
        base_url=rig.server.url + "/v1", api_key=rig.server.keys["client_key"], max_retries=0
    ) as client:
        plain = client.embeddings.create(
            model="mock-gpt", input=["one two", "three"], encoding_format="float"
        )
        packed = client.embeddings.create(model="mock-gpt", input="one two")  # base64
    assert plain.model == "mock-gpt"
    assert [d.embedding for d in plain.data] == [[7, 2, 0.5, -0.25], [5, 1, 0.5, -0.25]]
    assert [d.index for d in plain.data] == [0, 1]
    assert plain.usage.prompt_tokens == 3
    assert packed.data[0].embedding == [7, 2, 0.5, -0.25]
    [sent, *_] = [r for r in rig.main.requests() if r["path"] == "/v1/embeddings"]
    assert sent["body"]["model"] == "mock-upstream"
    assert sent["body"]["input"] == ["one two", "three"]
    assert sent["authorization"] == f"Bearer {PROVIDER_KEY}"


def test_a_synchronous_call_asks_upstream_for_a_plain_answer(rig: Rig) -> None:
    import httpx

    r = httpx.post(
        rig.server.url + "/v1/chat/completions",
        json={"model": "mock-gpt", "messages": [{"role": "user", "content": "whole please"}]},
        headers={"Authorization": f"Bearer {rig.server.keys['client_key']}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "whole please"
    assert r.json()["usage"]["completion_tokens"] > 0
    [seen] = [q for q in model_requests(rig.main) if "whole please" in str(q["body"])]
    assert not seen["body"].get("stream")  # one plain upstream call, no stream


def test_429_is_retried_after_retry_after(rig: Rig) -> None:
    rig.main.control(fail=[429, 429], retry_after=2.5)
    job = submit_chat(rig.server, "rate limited at first", "mock-gpt")
    (done,) = wait_jobs(rig.server, [job], {"completed", "failed"}, timeout=30)
    assert done["status"] == "completed", done
    assert answer(done) == "rate limited at first"
    assert done["attempts"] == 1  # provider retries happen inside one lease

    seen = model_requests(rig.main)
    assert [r["status"] for r in seen] == [429, 429, 200]
    # exponential backoff alone would wait 1-2 s, then 2-3 s: these gaps are Retry-After's
    spacing = gaps([r["t"] for r in seen])
    assert all(2.4 <= g < 6 for g in spacing), spacing


def test_429_without_retry_after_waits_for_the_ratelimit_reset(rig: Rig) -> None:
    rig.main.control(fail=[429], retry_after=None, reset_requests=3)
    job = submit_chat(rig.server, "rate limited, reset header only", "mock-gpt")
    (done,) = wait_jobs(rig.server, [job], {"completed", "failed"}, timeout=30)
    assert done["status"] == "completed", done
    seen = model_requests(rig.main)
    assert [r["status"] for r in seen] == [429, 200]
    # `x-ratelimit-remaining-requests: 0` + `x-ratelimit-reset-requests: 3s`; backoff
    # alone would have tried again after 1-2 s
    (gap,) = gaps([r["t"] for r in seen])
    assert 2.9 <= gap < 6, gap


def test_500_twice_then_success(rig: Rig) -> None:
    rig.main.control(fail=[500, 500])
    job = submit_chat(rig.server, "flaky upstream", "mock-gpt")
    (done,) = wait_jobs(rig.server, [job], {"completed", "failed"}, timeout=30)
    assert done["status"] == "completed", done
    assert answer(done) == "flaky upstream"
    seen = model_requests(rig.main)
    assert [r["status"] for r in seen] == [500, 500, 200]
    spacing = gaps([r["t"] for r in seen])
    assert all(g >= 0.5 for g in spacing), f"no backoff between tries: {spacing}"


def test_permanent_400_fails_the_job_at_once(rig: Rig) -> None:
    rig.main.control(always=400)
    job = submit_chat(rig.server, "a request the provider rejects", "mock-gpt")
    (done,) = wait_jobs(rig.server, [job], {"failed", "completed", "cancelled"}, timeout=30)
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "invalid_request", done["error"]
    assert done["error"]["retryable"] is False
    assert done["attempts"] == 1
    assert [r["status"] for r in model_requests(rig.main)] == [400]
    assert len(log_events(rig.node, "job failed", job)) == 1


def test_rpm_spaces_requests(rig: Rig) -> None:
    # a first job warms LiteLLM's client up, so that arrival times show the pacing
    warm = submit_chat(rig.server, "warm up", "mock-paced")
    wait_jobs(rig.server, [warm], "completed", timeout=30)
    rig.paced.control(reset=True)

    ids = [submit_chat(rig.server, f"paced {i}", "mock-paced") for i in range(6)]
    wait_jobs(rig.server, ids, "completed", timeout=30)
    times = sorted(r["t"] for r in model_requests(rig.paced))
    assert len(times) == 6
    spacing = gaps(times)
    # paced every 1/k s (a burst arrives within a few ms); arrival times carry some
    # jitter of their own, hence the slack
    assert min(spacing) >= 0.5 / RPM_K, spacing
    assert times[-1] - times[0] >= 4 / RPM_K, spacing


def test_api_key_env_is_read_from_the_environment(rig: Rig) -> None:
    job = submit_chat(rig.server, "keyed request", "mock-env")
    (done,) = wait_jobs(rig.server, [job], {"completed", "failed"}, timeout=30)
    assert done["status"] == "completed", done
    assert [r["authorization"] for r in model_requests(rig.keyed)] == [f"Bearer {ENV_KEY}"]
    assert ENV_KEY not in rig.node.stdout() + rig.node.stderr()


def test_missing_api_key_env_stops_the_node(rig: Rig) -> None:
    model = litellm_model("mock-env", rig.keyed, api_key_env="OBB_TEST_UNSET_VARIABLE")
    del model["api_key"]
    config = write_config(rig.tmp / "unset" / "node.toml", rig.server, [model])
    node = start_node(rig.procs, config)
    assert node.wait(timeout=60) == 1
    assert "OBB_TEST_UNSET_VARIABLE" in node.stderr()
    assert model_requests(rig.keyed) == []
