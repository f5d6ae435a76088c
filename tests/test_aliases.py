"""Model aliases with fallbacks (docs/aliases.md): a real server, a real node whose
provider fails every request (the OpenAI mock answering 500) for the first member, and a
real echo node for the second; and the queue's rules over a real store where a clock is
needed, and the settings' checks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from openbeepboop.client import Client
from openbeepboop.server.core.queue import JobRequest, Queue, QueueConfig
from openbeepboop.server.models import ApiKey, JobStatus, Role
from openbeepboop.server.settings import ConfigError, load_settings
from openbeepboop.server.store.sqlite import SqliteStore
from tests.conftest import ServerProcess
from tests.nodes import (
    SERVER_LOG_WARNING,
    MockOpenAI,
    Procs,
    auth,
    get_job,
    new_server,
    node_id_of,
    start_node,
    submit_chat,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.filterwarnings(SERVER_LOG_WARNING)

FIRST, SECOND = "gpt-4o-mini", "gemma-3-270m"
ALIASES = {"fast": [FIRST, SECOND], "spare": ["ghost-model", SECOND]}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, MockOpenAI]]:
    """A server with the aliases; node A serves FIRST through a provider that answers 500
    to everything (no retries on the node), node B serves SECOND with the echo backend."""
    root = tmp_path_factory.mktemp("aliases")
    procs = Procs()
    server = new_server(root / "server", OPENBEEPBOOP_MODEL_ALIASES=json.dumps(ALIASES))
    try:
        mock = MockOpenAI(procs, root, "--always", "500")
        failing = {
            "name": FIRST,
            "backend": "openai",
            "api_base": mock.url + "/v1",
            "model": FIRST,
            "max_attempts": 1,
        }
        config_a = write_config(root / "a" / "node.toml", server, [failing])
        config_b = write_config(
            root / "b" / "node.toml", server, [{"name": SECOND, "backend": "echo"}]
        )
        node_id_of(start_node(procs, config_a, tag="a"))
        node_id_of(start_node(procs, config_b, tag="b"))
        yield server, mock
    finally:
        procs.close()
        server.kill(signal.SIGTERM)


def test_the_aliases_jobs_complete_on_the_second_member(
    fleet: tuple[ServerProcess, MockOpenAI],
) -> None:
    server, mock = fleet
    ids = [submit_chat(server, f"job {i}", model="fast") for i in range(3)]
    r = httpx.post(  # /v1/jobs too
        server.url + "/v1/jobs",
        json={"endpoint": "/v1/chat/completions", "body": _chat("fast", "job 3")},
        headers=auth(server.keys["client_key"]),
        timeout=10,
    )
    assert r.status_code in (200, 201, 202), r.text
    ids.append(r.json()["id"])

    def finished() -> list[dict[str, Any]] | None:
        jobs = [get_job(server, i) for i in ids]
        return jobs if all(j["status"] in ("completed", "failed") for j in jobs) else None

    jobs = wait_until(finished, 30, "the alias's jobs to finish")
    for i, job in enumerate(jobs):
        assert job["status"] == "completed", job
        assert (job["model"], job["alias"], job["result"]["model"]) == (SECOND, "fast", SECOND)
        assert job["result"]["choices"][0]["message"]["content"] == f"job {i}"
        assert job["metadata"] is None  # the alias's bookkeeping is not the owner's
    tried = [q["body"]["model"] for q in mock.requests() if q["status"] == 500]
    assert tried.count(FIRST) >= len(ids)  # each was tried on the first member first
    with Client(base_url=server.url, api_key=server.keys["client_key"]) as client:
        seen = client.jobs.get(ids[0])
        assert (seen.alias, seen.data["model"], seen.cached) == ("fast", SECOND, False)


def test_sync_and_streamed_requests_fall_back(fleet: tuple[ServerProcess, MockOpenAI]) -> None:
    server, _ = fleet
    key = auth(server.keys["client_key"])
    # no node serves the first member of `spare`: the second answers at once
    r = httpx.post(
        server.url + "/v1/chat/completions", json=_chat("spare", "hi"), headers=key, timeout=30
    )
    assert r.status_code == 200, r.text
    assert (r.json()["model"], r.json()["choices"][0]["message"]["content"]) == (SECOND, "hi")
    # the first member of `fast` fails: the answer comes from the second, synchronously
    r = httpx.post(
        server.url + "/v1/chat/completions", json=_chat("fast", "sync"), headers=key, timeout=30
    )
    assert r.status_code == 200, r.text
    assert (r.json()["model"], r.json()["choices"][0]["message"]["content"]) == (SECOND, "sync")
    body = {**_chat("fast", "two words"), "stream": True}
    with httpx.stream(
        "POST", server.url + "/v1/chat/completions", json=body, headers=key, timeout=30
    ) as s:
        lines = [ln.removeprefix("data: ") for ln in s.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(ln) for ln in lines[:-1]]
    assert not any("error" in c for c in chunks), chunks
    assert chunks[-1]["model"] == SECOND  # the last chunk names the member that answered
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "two words"


def test_models_lists_the_aliases(fleet: tuple[ServerProcess, MockOpenAI]) -> None:
    server, _ = fleet
    key = auth(server.keys["client_key"])
    listed = httpx.get(server.url + "/v1/models", headers=key, timeout=10).json()["data"]
    by_id = {m["id"]: m for m in listed}
    assert {FIRST, SECOND, "fast", "spare"} <= set(by_id)
    assert by_id["fast"]["alias"] is True and by_id["fast"]["members"] == [FIRST, SECOND]
    assert by_id["fast"]["object"] == "model" and by_id["fast"]["nodes"] == 2
    one = httpx.get(server.url + "/v1/models/spare", headers=key, timeout=10).json()
    assert (one["members"], one["served_members"], one["nodes"]) == (
        ["ghost-model", SECOND],
        [SECOND],
        1,
    )


# -- the queue's rules over a real store -----------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_a_queued_job_stranded_on_an_unserved_member_moves_on(tmp_path: Path) -> None:
    """A job queued on the first member (served when it was submitted) moves to the next
    served member once it has waited `alias_wait_seconds` with no node for it."""
    clock = Clock()
    store = SqliteStore(tmp_path / "q.db")
    await store.open()
    try:
        config = QueueConfig(aliases=ALIASES, alias_wait_seconds=5.0, node_ttl_seconds=10.0)
        queue = Queue(store, config, clock=clock)
        owner = ApiKey("k1", Role.ADMIN, "h", "obb", "k", 0.0)
        models = [{"name": m} for m in (FIRST, SECOND)]
        await queue.register_node(owner, "a", [models[0]], 1, {}, "t")
        await queue.register_node(owner, "b", [models[1]], 1, {}, "t")
        asked = JobRequest("/v1/chat/completions", _chat("fast", "x"), idempotency_key="i1")
        [outcome] = await queue.submit(owner, [asked])
        job = outcome.job
        assert (job.model, job.request["model"]) == (FIRST, FIRST)
        # a replay of the same request finds the same job (hashed as asked)
        assert (await queue.submit(owner, [asked]))[0].job.id == job.id
        # a batch's line for `spare`, whose first member no node serves, runs on the second
        line = JobRequest("/v1/chat/completions", _chat("spare", "y"), batch_id="batch_1")
        [queued] = await queue.enqueue(owner.id, [line])
        assert (queued.job.model, queued.job.metadata) == (SECOND, {"openbeepboop.alias": "spare"})
        clock.now += 6.0
        assert await queue.move_stranded() == 0  # its member's node is still live
        await queue.register_node(owner, "b", [models[1]], 1, {}, "t")  # only b stays
        clock.now += 6.0
        assert await queue.move_stranded() == 1
        moved = await store.get_job(job.id)
        assert moved is not None
        assert (moved.status, moved.model, moved.request["model"]) == (
            JobStatus.QUEUED,
            SECOND,
            SECOND,
        )
        assert await queue.move_stranded() == 0  # the last member: it stays
        again = await queue.rerun(owner, job.id)  # asked of the alias again
        assert (again.model, again.metadata) == (SECOND, {"openbeepboop.alias": "fast"})
    finally:
        await store.close()


# -- mistakes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("aliases", "says"),
    [
        ({"fast": []}, "alias 'fast' has no members"),
        ({"fast": ["fast", "b"]}, "alias 'fast' is one of its own members"),
        ({"a": ["b"], "b": ["a"]}, "aliases do not nest"),
        ({"fast": ["a", "a"]}, "names a member twice"),
    ],
)
def test_alias_mistakes_are_clear_errors(
    tmp_path: Path, aliases: dict[str, list[str]], says: str
) -> None:
    with pytest.raises(ConfigError, match=says):
        load_settings(tmp_path, model_aliases=aliases)


def test_aliases_that_are_not_json_are_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENBEEPBOOP_MODEL_ALIASES", "fast = [a, b]")
    with pytest.raises(ConfigError, match=r'field "model_aliases".*Expecting value'):
        load_settings(tmp_path)


def test_a_bad_alias_stops_the_server_with_a_clear_message(tmp_path: Path) -> None:
    (tmp_path / "server.toml").write_text('model_aliases = { a = ["b"], b = ["c"] }\n')
    argv = [sys.executable, "-m", "openbeepboop.cli.server", "start", "--data-dir", str(tmp_path)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode != 0
    assert "aliases do not nest" in out.stderr and "Traceback" not in out.stderr


def _chat(model: str, text: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}]}
