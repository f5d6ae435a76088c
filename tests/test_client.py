"""The client library (`Client`, `AsyncClient`) against a real `openbeepboop serve` on
loopback: the README's example, errors, idempotency, bulk submit and waiting for many."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from openbeepboop import AsyncClient, Client
from openbeepboop.client import (
    APIConnectionError,
    AuthenticationError,
    BadRequestError,
    JobFailedError,
    JobTimeoutError,
    NotFoundError,
    OpenBeepBoopError,
)
from tests.allinone import AllInOne, all_in_one
from tests.conftest import free_port

pytestmark = pytest.mark.slow

UNSERVED = "nobody-serves-this"
POLL = "/v1/results/poll"


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AllInOne]:
    with all_in_one(tmp_path_factory.mktemp("serve") / "data") as server:
        yield server


@pytest.fixture
def client(serve: AllInOne) -> Iterator[Client]:
    c = Client(base_url=serve.url, api_key=serve.key)
    yield c
    c.close()


def chat(content: str, model: str = "echo", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def answer(job: object) -> str:
    return str(job.get(wait=True, timeout=60).choices[0].message.content)  # type: ignore[attr-defined]


# -- the README ---------------------------------------------------------------------------


def test_readme_example_with_the_real_gemma_model(
    serve: AllInOne, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENBEEPBOOP_API_KEY", serve.key)
    monkeypatch.delenv("OPENBEEPBOOP_BASE_URL", raising=False)
    # as the README has it (model and server are this machine's)
    client = Client(base_url=serve.url)
    started = time.monotonic()
    job = client.chat.completions.create(
        model="gemma-3-270m",
        messages=[{"role": "user", "content": "Explain quantum computing in one sentence."}],
    )
    assert time.monotonic() - started < 5  # returns at once, before the model runs
    assert job.id.startswith("job_")
    assert job.status in ("queued", "in_progress", "completed")
    result = job.get(wait=True)
    content = result.choices[0].message.content
    assert isinstance(content, str) and content.strip()
    assert result.model == "gemma-3-270m"
    assert result.usage.completion_tokens > 0
    assert job.status == "completed"
    assert job.data["node_id"]
    client.close()


def test_readme_example_with_echo(serve: AllInOne, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENBEEPBOOP_API_KEY", serve.key)
    client = Client(base_url=serve.url)
    try:
        job = client.chat.completions.create(
            model="echo",
            messages=[{"role": "user", "content": "Explain quantum computing in one sentence."}],
        )
        print(f"Job submitted with ID: {job.id}")
        result = job.get(wait=True)
        assert result.choices[0].message.content == "Explain quantum computing in one sentence."
        assert result.object == "chat.completion"
        assert result.id and result.choices[0].finish_reason == "stop"
    finally:
        client.close()


def test_text_completions(client: Client) -> None:
    job = client.completions.create(model="echo", prompt="once upon a time")
    result = job.get(wait=True, timeout=30)
    assert result.choices[0].text == "once upon a time"
    assert result.object == "text_completion"
    assert job.data["endpoint"] == "/v1/completions"


def test_status_refreshes_from_the_server(client: Client) -> None:
    job = client.chat.completions.create(**chat("refresh me"))
    deadline = time.monotonic() + 30
    while job.status != "completed":  # each read asks the server
        assert time.monotonic() < deadline, job.data
        time.sleep(0.05)
    assert job.done
    assert job.result.choices[0].message.content == "refresh me"


# -- configuration ------------------------------------------------------------------------


def test_configuration_from_the_environment(
    serve: AllInOne, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENBEEPBOOP_BASE_URL", serve.url + "/v1/")  # an OpenAI-style URL
    monkeypatch.setenv("OPENBEEPBOOP_API_KEY", serve.key)
    with Client() as client:
        assert client.base_url == serve.url
        assert answer(client.chat.completions.create(**chat("from env"))) == "from env"


def test_the_key_that_serve_saved_locally_is_found(
    serve: AllInOne, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENBEEPBOOP_API_KEY", raising=False)
    monkeypatch.setenv("OPENBEEPBOOP_DATA_DIR", str(serve.data_dir))
    with Client(base_url=serve.url) as client:
        assert answer(client.chat.completions.create(**chat("local key"))) == "local key"


# -- waiting, cancelling, errors ----------------------------------------------------------


def test_wait_timeout_on_a_model_nobody_serves(serve: AllInOne, client: Client) -> None:
    job = client.chat.completions.create(**chat("forever", model=UNSERVED))
    assert job.get(wait=False) is None
    assert job.status == "queued"
    polls = serve.metric(POLL)
    started = time.monotonic()
    with pytest.raises(JobTimeoutError) as caught:
        job.get(wait=True, timeout=1)
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 3, elapsed
    assert isinstance(caught.value, TimeoutError)
    assert job.id in str(caught.value)
    assert serve.metric(POLL) - polls <= 3  # long-polled, not a busy loop
    assert job.status == "queued"  # the wait ran out; the job goes on
    job.cancel()


def test_cancel(client: Client) -> None:
    job = client.chat.completions.create(**chat("cancel me", model=UNSERVED))
    assert job.cancel() is job
    assert job.status == "cancelled"
    assert job.done
    with pytest.raises(JobFailedError) as caught:
        job.get()
    assert caught.value.job.id == job.id
    assert caught.value.job.status == "cancelled"
    assert isinstance(caught.value.job, type(job))  # the sync Job, not the async one inside
    assert "cancelled" in str(caught.value)
    with pytest.raises(JobFailedError):
        job.get(wait=False)
    # by id, too; cancelling again changes nothing
    again = client.jobs.cancel(job.id)
    assert again.status == "cancelled"
    assert client.jobs.get(job.id).status == "cancelled"


def test_not_found(client: Client) -> None:
    with pytest.raises(NotFoundError) as caught:
        client.jobs.get("job_nope")
    assert caught.value.status == 404
    assert caught.value.code == "job_not_found"
    assert "job_nope" in str(caught.value)
    with pytest.raises(NotFoundError):
        client.jobs.cancel("job_nope")
    # an id is one path segment: nothing in it can reach another job or route
    real = client.chat.completions.create(**chat("real"))
    for odd in (f"{real.id}?x=1", f"{real.id}#frag", f"../jobs/{real.id}"):
        with pytest.raises(NotFoundError):
            client.jobs.get(odd)


def test_bad_key(serve: AllInOne) -> None:
    client = Client(base_url=serve.url, api_key="obb_client_not-a-real-key")
    with client, pytest.raises(AuthenticationError) as caught:
        client.chat.completions.create(**chat("hi"))
    assert caught.value.status == 401
    assert caught.value.code == "invalid_api_key"


def test_no_key_says_how_to_pass_one(
    serve: AllInOne, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.delenv("OPENBEEPBOOP_API_KEY", raising=False)
    for name in ("HOME", "XDG_DATA_HOME", "OPENBEEPBOOP_DATA_DIR"):
        monkeypatch.setenv(name, str(empty))
    with Client(base_url=serve.url) as client, pytest.raises(AuthenticationError) as caught:
        client.jobs.list()
    assert caught.value.status == 401
    assert "OPENBEEPBOOP_API_KEY" in str(caught.value)
    assert "api_key" in str(caught.value)


def test_server_down_fails_fast_with_one_clear_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    client = Client(base_url=url, api_key="obb_client_x", max_retries=0)
    with client, pytest.raises(APIConnectionError) as caught:
        client.chat.completions.create(**chat("hi"))
    assert time.monotonic() - started < 3
    message = str(caught.value)
    assert url in message
    assert "\n" not in message
    assert len(message) < 300


def test_server_down_with_retries_still_fails_within_seconds() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    client = Client(base_url=url, api_key="obb_client_x")  # default retries
    with client, pytest.raises(APIConnectionError) as caught:
        client.jobs.list()
    assert time.monotonic() - started < 15
    assert url in str(caught.value)


# -- idempotency --------------------------------------------------------------------------


def test_idempotency_key_makes_a_retry_the_same_job(client: Client) -> None:
    first = client.chat.completions.create(**chat("once only"), idempotency_key="same")
    second = client.chat.completions.create(**chat("once only"), idempotency_key="same")
    assert second.id == first.id
    with pytest.raises(BadRequestError) as caught:
        client.chat.completions.create(**chat("something else"), idempotency_key="same")
    assert caught.value.status == 422
    assert caught.value.code == "idempotency_key_reused"
    assert first.id in str(caught.value)
    # without a key, two calls are two jobs
    a = client.chat.completions.create(**chat("twice"))
    b = client.chat.completions.create(**chat("twice"))
    assert a.id != b.id


# -- many jobs ----------------------------------------------------------------------------


def test_create_many_as_completed_wait_all_poll_and_list(client: Client) -> None:
    requests = [
        chat(f"prompt {i}", priority=i % 3, metadata={"i": str(i)}, custom_id=f"c{i}")
        for i in range(200)
    ]
    jobs = client.chat.completions.create_many(requests)
    assert len(jobs) == 200
    assert len({j.id for j in jobs}) == 200
    for i, job in enumerate(jobs):
        assert job.data["custom_id"] == f"c{i}"
        assert job.data["metadata"] == {"i": str(i)}
        assert job.data["priority"] == i % 3
        assert job.data["model"] == "echo"

    seen = [j.id for j in client.jobs.as_completed(jobs, timeout=30)]
    assert sorted(seen) == sorted(j.id for j in jobs)  # each exactly once
    finished = client.jobs.wait_all(jobs, timeout=30)
    assert [j.id for j in finished] == [j.id for j in jobs]
    for i, job in enumerate(finished):
        assert job.done and job.data["status"] == "completed", job.data
        assert job.result.choices[0].message.content == f"prompt {i}"

    polled = client.results.poll([j.id for j in jobs])
    assert [j.id for j in polled] == [j.id for j in jobs]
    assert {j.data["status"] for j in polled} == {"completed"}

    page1 = client.jobs.list(limit=5)
    page2 = client.jobs.list(limit=5, after=page1[-1].id)
    assert len(page1) == len(page2) == 5
    assert not {j.id for j in page1} & {j.id for j in page2}
    newest_first = [j.id for j in reversed(jobs)]
    assert [j.id for j in page1 + page2] == newest_first[:10]
    assert [j.id for j in client.jobs.list(limit=3, model="echo", status="completed")] == (
        newest_first[:3]
    )


def test_create_many_with_an_idempotency_prefix_is_rerunnable(client: Client) -> None:
    requests = [chat(f"rerun {i}") for i in range(5)]
    first = client.chat.completions.create_many(requests, idempotency_prefix="rerun-test")
    again = client.chat.completions.create_many(requests, idempotency_prefix="rerun-test")
    assert [j.id for j in again] == [j.id for j in first]
    texts = client.completions.create_many([{"model": "echo", "prompt": "p"}] * 3)
    assert [j.get(timeout=30).choices[0].text for j in texts] == ["p"] * 3


def test_as_completed_yields_finished_jobs_first_and_long_polls(
    serve: AllInOne, client: Client
) -> None:
    done = client.chat.completions.create(**chat("quick"))
    done.get(wait=True, timeout=30)
    waiting = [client.chat.completions.create(**chat(f"w{i}", model=UNSERVED)) for i in range(5)]
    polls = serve.metric(POLL)
    started = time.monotonic()
    seen = []
    with pytest.raises(JobTimeoutError):
        for job in client.jobs.as_completed([done, *waiting], timeout=3):
            seen.append(job.id)
    elapsed = time.monotonic() - started
    assert seen == [done.id]
    assert 2.9 <= elapsed < 6, elapsed
    assert serve.metric(POLL) - polls <= 4, "as_completed should long-poll, not busy-loop"
    for job in waiting:
        job.cancel()


def test_model_names_in_list_filters_are_url_encoded(client: Client) -> None:
    odd = "odd&model+name=x"
    job = client.chat.completions.create(**chat("odd", model=odd))
    try:
        listed = client.jobs.list(model=odd, limit=5)
        assert [j.id for j in listed] == [job.id]
    finally:
        job.cancel()


# -- inside a running event loop ----------------------------------------------------------


async def test_the_sync_client_works_inside_a_running_event_loop(serve: AllInOne) -> None:
    asyncio.get_running_loop()  # a loop is running here, as in Jupyter
    client = Client(base_url=serve.url, api_key=serve.key)
    try:
        job = client.chat.completions.create(**chat("inside a loop"))
        assert job.get(wait=True, timeout=30).choices[0].message.content == "inside a loop"
        jobs = client.chat.completions.create_many([chat(f"l{i}") for i in range(3)])
        assert len(list(client.jobs.as_completed(jobs, timeout=30))) == 3
    finally:
        client.close()


# -- AsyncClient --------------------------------------------------------------------------


async def test_async_client_core_flows(serve: AllInOne) -> None:
    async with AsyncClient(base_url=serve.url, api_key=serve.key) as client:
        job = await client.chat.completions.create(**chat("async hello"))
        assert job.id.startswith("job_") and job.status in ("queued", "in_progress", "completed")
        result = await job.get(wait=True, timeout=30)
        assert result.choices[0].message.content == "async hello"

        text = await client.completions.create(model="echo", prompt="async text")
        assert (await text.get(wait=True, timeout=30)).choices[0].text == "async text"

        requests = [chat(f"a{i}", metadata={"n": str(i)}, custom_id=f"a{i}") for i in range(20)]
        jobs = await client.chat.completions.create_many(requests)
        assert [j.data["custom_id"] for j in jobs] == [f"a{i}" for i in range(20)]
        seen = [j.id async for j in client.jobs.as_completed(jobs, timeout=30)]
        assert sorted(seen) == sorted(j.id for j in jobs)
        finished = await client.jobs.wait_all(jobs, timeout=30)
        for i, j in enumerate(finished):
            assert j.result.choices[0].message.content == f"a{i}"
            assert j.data["metadata"] == {"n": str(i)}
        polled = await client.results.poll([j.id for j in jobs])
        assert {j.status for j in polled} == {"completed"}
        listed = await client.jobs.list(limit=20)
        assert [j.id for j in listed] == [j.id for j in reversed(jobs)]
        assert (await client.jobs.get(job.id)).status == "completed"


async def test_async_client_waiting_cancelling_and_errors(serve: AllInOne) -> None:
    async with AsyncClient(base_url=serve.url, api_key=serve.key) as client:
        job = await client.chat.completions.create(**chat("never", model=UNSERVED))
        assert await job.get(wait=False) is None
        started = time.monotonic()
        with pytest.raises(JobTimeoutError):
            await job.get(wait=True, timeout=1)
        assert 0.9 <= time.monotonic() - started < 2.5
        await job.cancel()
        assert job.status == "cancelled"
        with pytest.raises(JobFailedError) as failed:
            await job.get()
        assert failed.value.job is job

        same = await client.chat.completions.create(**chat("idem"), idempotency_key="async-k")
        again = await client.chat.completions.create(**chat("idem"), idempotency_key="async-k")
        assert again.id == same.id
        with pytest.raises(BadRequestError) as reused:
            await client.chat.completions.create(**chat("other"), idempotency_key="async-k")
        assert reused.value.status == 422

        with pytest.raises(NotFoundError) as missing:
            await client.jobs.get("job_nope")
        assert missing.value.status == 404 and missing.value.code == "job_not_found"

    async with AsyncClient(base_url=serve.url, api_key="obb_client_bad") as bad:
        with pytest.raises(AuthenticationError):
            await bad.jobs.list()
    url = f"http://127.0.0.1:{free_port()}"
    async with AsyncClient(base_url=url, api_key="k", max_retries=0) as down:
        with pytest.raises(APIConnectionError) as caught:
            await down.jobs.list()
    assert url in str(caught.value) and "\n" not in str(caught.value)
    assert isinstance(caught.value, OpenBeepBoopError)


def test_the_readme_errors_import_from_the_package_root_without_loading_the_client() -> None:
    import subprocess
    import sys

    import openbeepboop
    import openbeepboop.client as client_module

    for name in client_module.__all__:
        assert getattr(openbeepboop, name) is getattr(client_module, name), name
    # the server and the node import `openbeepboop` and must not pay for the client
    code = (
        "import sys, openbeepboop; assert 'openbeepboop.client' not in sys.modules;"
        "from openbeepboop import JobFailedError, RateLimitError, AuthenticationError;"
        "assert 'openbeepboop.client' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        openbeepboop.Nope  # noqa: B018
