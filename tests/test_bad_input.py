"""Every user mistake gets the right 4xx in OpenAI's error shape, never a 500, and
loses nothing that was already acknowledged."""

from __future__ import annotations

import asyncio
import copy
import json
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NamedTuple

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Api, serve_in_process

MSGS = [{"role": "user", "content": "hi"}]
CHAT = {"model": "echo", "messages": MSGS}
BIG = 2**70  # valid JSON, but beyond what the store can keep
UNKNOWN_KEY = "obb_client_" + "A" * 43


def chat(**extra: Any) -> dict[str, Any]:
    return {**CHAT, **extra}


def assert_openai_error(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["type"], str)
    return dict(error)


async def snapshot(api: Api) -> list[dict[str, Any]]:
    """Every job in the store, as the admin sees it."""
    r = await api.http.get("/v1/jobs?limit=1000", headers=api.h(api.admin))
    assert r.status_code == 200
    return list(r.json()["data"])


async def seed(api: Api) -> list[dict[str, Any]]:
    """Two acknowledged jobs, one of them leased: the state bad requests must not touch."""
    await api.submit("first")
    await api.submit("second", priority=1)
    node_id = await api.register(["echo"])
    r = await api.http.post(
        "/internal/queue/fetch",
        json={"node_id": node_id, "models": ["echo"]},
        headers=api.h(api.node),
    )
    assert len(r.json()["jobs"]) == 1
    return await snapshot(api)


# -- the table ---------------------------------------------------------------------

# key: a role of the `api` fixture, "none" (no header), or a literal Authorization value.
KEYS = {"none": None, "garbage": "Bearer garbage", "basic": "Basic dXNlcjpwYXNz"}
KEYS["unknown"] = f"Bearer {UNKNOWN_KEY}"
CC, JOBS, POLL = "/v1/chat/completions", "/v1/jobs", "/v1/results/poll"
FETCH, BEAT, SUBMIT = "/internal/queue/fetch", "/internal/queue/heartbeat", "/internal/queue/submit"
REGISTER, KEYS_URL = "/internal/nodes/register", "/v1/admin/keys"
ANY_FETCH = {"node_id": "n", "models": ["echo"]}
FILES, BATCHES, TEMPLATES_URL = "/v1/files", "/v1/batches", "/v1/templates"


def batch(**extra: Any) -> dict[str, Any]:
    return {"input_file_id": "file-nope", "endpoint": CC, **extra}


def template(**extra: Any) -> dict[str, Any]:
    stream = {"provider": "p", "settings": {"model": "echo"}, "messages": MSGS}
    return {"name": "t", "streams": [stream], **extra}


class Case(NamedTuple):
    name: str
    path: str
    body: Any = None
    status: int = 400
    param: str | None = None
    code: str | None = None
    key: str | None = None  # default: client for /v1, node for /internal, admin for admin
    method: str = "POST"
    raw: bytes | None = None

    @property
    def role(self) -> str:
        if self.key:
            return self.key
        if self.path.startswith(KEYS_URL):
            return "admin"
        return "node" if self.path.startswith("/internal") else "client"


c = Case
CASES = [
    # unreadable or non-object bodies
    c("malformed-json", CC, raw=b'{"model": ', code="invalid_json"),
    c("malformed-json-jobs", JOBS, raw=b"{'a': 1}", code="invalid_json"),
    c("malformed-json-node", FETCH, raw=b"{,}", code="invalid_json"),
    c("empty-body", CC, raw=b""),
    c("json-array", CC, [CHAT]),
    c("json-string", JOBS, "jobs"),
    c("json-null", POLL, raw=b"null"),
    # wrong types and values
    c("messages-not-list", CC, chat(messages="hi"), param="messages"),
    c("messages-empty", CC, chat(messages=[]), param="messages"),
    c("bad-role", CC, chat(messages=[{"role": "wizard"}]), param="messages[0].role"),
    c("model-not-string", CC, chat(model=5), param="model"),
    c("temperature-word", CC, chat(temperature="hot"), param="temperature"),
    c("max-tokens-negative", CC, chat(max_tokens=-1), param="max_tokens"),
    c("priority-word", CC, chat(priority="high"), param="priority"),
    c("expires-in-past", CC, chat(expires_at=1000.0), param="expires_at"),
    c("expires-far-future", CC, chat(expires_at=1e300), param="expires_at"),
    c("expires-infinite", JOBS, raw=b'{"body": {}, "expires_at": Infinity}', param="expires_at"),
    c("ttl-zero", CC, chat(ttl_seconds=0), param="ttl_seconds"),
    c("ttl-far-future", JOBS, {"body": CHAT, "ttl_seconds": 1e300}, param="ttl_seconds"),
    c("huge-int", CC, chat(seed=BIG)),
    c("huge-int-metadata", JOBS, {"body": CHAT, "metadata": {"n": BIG}}),
    # missing fields
    c("no-model", CC, {"messages": MSGS}, param="model"),
    c("no-messages", CC, {"model": "echo"}, param="messages"),
    c("no-prompt", "/v1/completions", {"model": "echo"}, param="prompt"),
    c("job-no-body", JOBS, {"priority": 1}, param="body"),
    c("job-bad-url", JOBS, {"url": "/v1/moderations", "body": CHAT}, param="url"),
    c("job-unknown-field", JOBS, {"body": CHAT, "colour": "red"}, param="colour"),
    c("job-body-no-model", JOBS, {"body": {"messages": MSGS}}, param="body.model"),
    c("bulk-empty", JOBS, {"jobs": []}, param="jobs"),
    c("bulk-item-not-object", JOBS, {"jobs": [{"body": CHAT}, 7]}, param="jobs[1]"),
    c("poll-no-ids", POLL, {}, param="ids"),
    c("poll-ids-not-list", POLL, {"ids": "job_1"}, param="ids"),
    c("poll-negative-wait", POLL, {"ids": ["x"], "wait": -1}, param="wait"),
    c("fetch-no-node-id", FETCH, {"models": ["echo"]}, param="node_id"),
    c("fetch-zero-jobs", FETCH, {**ANY_FETCH, "max_jobs": 0}, param="max_jobs"),
    c("beat-leases-not-list", BEAT, {"node_id": "n", "lease_ids": "l"}, param="lease_ids"),
    c("submit-no-results", SUBMIT, {"results": []}, param="results"),
    c("submit-no-lease", SUBMIT, {"results": [{"job_id": "j"}]}, param="results[0].lease_id"),
    c("submit-huge-int", SUBMIT, {"results": [{"job_id": "j", "lease_id": "l", "result": [BIG]}]}),
    c("register-huge-int", REGISTER, {"hardware": {"gpus": BIG}}),
    c("register-zero-capacity", REGISTER, {"capacity": 0}, param="capacity"),
    c("admin-bad-role", KEYS_URL, {"role": "god"}, param="role"),
    # query strings
    c("status-bogus", "/v1/jobs?status=bogus", method="GET", param="status"),
    c("limit-zero", "/v1/jobs?limit=0", method="GET", param="limit"),
    c("limit-too-big", "/v1/jobs?limit=1001", method="GET", param="limit"),
    c("limit-word", "/v1/jobs?limit=ten", method="GET", param="limit"),
    c("after-unknown", "/v1/jobs?after=job_nope", method="GET", param="after"),
    # unknown things
    c("unknown-route", "/v1/nope", method="GET", status=404, code="not_found"),
    c("unknown-version", "/v2/chat/completions", CHAT, status=404),
    c("unknown-job", "/v1/jobs/job_nope", method="GET", status=404, code="job_not_found"),
    c("cancel-unknown-job", "/v1/jobs/job_nope/cancel", status=404),
    c("unknown-node-fetch", FETCH, ANY_FETCH, status=404, param="node_id"),
    c("unknown-node-beat", BEAT, {"node_id": "node_x"}, status=404, param="node_id"),
    c("revoke-unknown-key", KEYS_URL + "/key_nope/revoke", status=404),
    # wrong method
    c("get-chat", CC, method="GET", status=405, code="method_not_allowed"),
    c("delete-job", "/v1/jobs/job_x", method="DELETE", status=405),
    c("put-fetch", FETCH, {}, method="PUT", status=405),
    # who you are
    c("no-key", CC, CHAT, key="none", status=401, code="missing_api_key"),
    c("garbage-key", CC, CHAT, key="garbage", status=401, code="invalid_api_key"),
    c("unknown-key", JOBS, method="GET", key="unknown", status=401, code="invalid_api_key"),
    c("basic-auth", "/v1/models", method="GET", key="basic", status=401),
    c("no-key-node", FETCH, ANY_FETCH, key="none", status=401),
    c("client-fetches", FETCH, ANY_FETCH, key="client", status=403, code="permission_denied"),
    c("client-registers", REGISTER, {}, key="client", status=403),
    c(
        "client-submits",
        SUBMIT,
        {"results": [{"job_id": "j", "lease_id": "l"}]},
        key="client",
        status=403,
    ),
    c("node-chats", CC, CHAT, key="node", status=403),
    c("node-posts-jobs", JOBS, {"body": CHAT}, key="node", status=403),
    c("node-lists-jobs", JOBS, method="GET", key="node", status=403),
    c("node-polls", POLL, {"ids": ["x"]}, key="node", status=403),
    c("client-makes-keys", KEYS_URL, {"role": "admin"}, key="client", status=403),
    c("node-lists-keys", KEYS_URL, method="GET", key="node", status=403),
    # files, batches, templates, events
    c("files-json-body", FILES, {"purpose": "batch"}, param="file"),
    c("unknown-file", FILES + "/file-nope", method="GET", status=404, code="file_not_found"),
    c("unknown-file-content", FILES + "/file-nope/content", method="GET", status=404),
    c("delete-unknown-file", FILES + "/file-nope", method="DELETE", status=404),
    c("files-limit-zero", FILES + "?limit=0", method="GET", param="limit"),
    c("files-after-unknown", FILES + "?after=file-nope", method="GET", param="after"),
    c("batch-no-file-id", BATCHES, {"endpoint": CC}, param="input_file_id"),
    c("batch-bad-endpoint", BATCHES, batch(endpoint="/v1/moderations"), param="endpoint"),
    c("batch-bad-window", BATCHES, batch(completion_window="forever"), param="completion_window"),
    c("batch-unknown-file", BATCHES, batch(), status=404, code="file_not_found"),
    c("batch-metadata-not-strings", BATCHES, batch(metadata={"a": 1})),
    c("batch-metadata-too-many", BATCHES, batch(metadata={str(i): "v" for i in range(17)})),
    c("unknown-batch", BATCHES + "/batch_nope", method="GET", status=404, code="batch_not_found"),
    c("cancel-unknown-batch", BATCHES + "/batch_nope/cancel", status=404),
    c("batches-limit-big", BATCHES + "?limit=101", method="GET", param="limit"),
    c("template-bad-name", TEMPLATES_URL, template(name="a b"), param="name"),
    c("template-no-streams", TEMPLATES_URL, template(streams=[]), param="streams"),
    c(
        "template-no-model",
        TEMPLATES_URL,
        template(streams=[{"settings": {}, "messages": MSGS}]),
        param="streams[0].settings.model",
    ),
    c(
        "template-bad-insert",
        TEMPLATES_URL,
        template(streams=[{"settings": {"model": "m"}, "messages": [{"insert": "memory"}]}]),
        param="streams[0].messages[0]",
    ),
    c("unknown-template", TEMPLATES_URL + "/nope", method="GET", status=404),
    c("job-unknown-template", JOBS, {"template": "nope"}, status=404, code="template_not_found"),
    c("job-template-and-body", JOBS, {"template": "x", "body": CHAT}, param="template"),
    c("events-unknown-job", "/v1/jobs/job_nope/events", method="GET", status=404),
    c("node-uploads", FILES, {"purpose": "batch"}, key="node", status=403),
    c("node-lists-batches", BATCHES, method="GET", key="node", status=403),
    c("node-lists-templates", TEMPLATES_URL, method="GET", key="node", status=403),
]


async def test_bad_requests(api: Api, subtests: Any) -> None:
    """Each row: the status, param and code it must get, and the store left as it was."""
    before = await seed(api)
    secrets = {"client": api.client, "node": api.node, "admin": api.admin}
    for case in CASES:
        with subtests.test(msg=case.name):
            auth = f"Bearer {secrets[case.role]}" if case.role in secrets else KEYS[case.role]
            headers = {"content-type": "application/json", "Prefer": "respond-async"}
            if auth:
                headers["Authorization"] = auth
            content = case.raw
            if content is None and case.body is not None:
                content = json.dumps(case.body).encode()
            r = await api.http.request(case.method, case.path, content=content, headers=headers)
            error = assert_openai_error(r, case.status)
            if case.param is not None:
                assert error["param"] == case.param
            if case.code is not None:
                assert error["code"] == case.code
            assert "None" not in error["message"]
            assert await snapshot(api) == before


# -- mistakes that need their own setup --------------------------------------------


async def test_idempotency_header_mistakes(api: Api) -> None:
    before = await seed(api)
    long_key = api.h(api.client, **{"Idempotency-Key": "k" * 256})
    r = await api.http.post("/v1/jobs", json={"body": CHAT}, headers=long_key)
    assert assert_openai_error(r, 400)["param"] == "Idempotency-Key"
    on_bulk = api.h(api.client, **{"Idempotency-Key": "k"})
    r = await api.http.post("/v1/jobs", json={"jobs": [{"body": CHAT}]}, headers=on_bulk)
    assert assert_openai_error(r, 400)["param"] == "Idempotency-Key"
    assert await snapshot(api) == before


async def test_oversized_bodies_are_413(make_api: Any) -> None:
    async with make_api(max_body_bytes=1000, rate_limit="") as api:
        before = await seed(api)
        headers = api.h(api.client, Prefer="respond-async")
        big = chat(messages=[{"role": "user", "content": "x" * 2000}])
        r = await api.http.post("/v1/chat/completions", json=big, headers=headers)
        assert assert_openai_error(r, 413)["code"] == "request_too_large"

        async def chunks() -> AsyncIterator[bytes]:
            yield json.dumps(big).encode()[:600]
            yield json.dumps(big).encode()[600:]

        streamed = {**headers, "content-type": "application/json"}
        r = await api.http.post("/v1/chat/completions", content=chunks(), headers=streamed)
        assert "content-length" not in r.request.headers
        assert assert_openai_error(r, 413)["code"] == "request_too_large"
        assert await snapshot(api) == before
        r = await api.http.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert r.status_code == 202


async def test_revoked_key_is_401(api: Api) -> None:
    made = (
        await api.http.post("/v1/admin/keys", json={"role": "client"}, headers=api.h(api.admin))
    ).json()
    assert (await api.http.get("/v1/jobs", headers=api.h(made["key"]))).status_code == 200
    await api.http.post(f"/v1/admin/keys/{made['id']}/revoke", headers=api.h(api.admin))
    r = await api.http.post(
        "/v1/chat/completions", json=CHAT, headers=api.h(made["key"], Prefer="respond-async")
    )
    assert assert_openai_error(r, 401)["code"] == "invalid_api_key"
    assert await snapshot(api) == []


async def test_other_clients_job_is_invisible_and_untouched(api: Api) -> None:
    job = await api.submit()
    theirs = api.h(api.other_client)
    r = await api.http.get(f"/v1/jobs/{job['id']}", headers=theirs)
    assert assert_openai_error(r, 404)["code"] == "job_not_found"
    r = await api.http.post(f"/v1/jobs/{job['id']}/cancel", headers=theirs)
    assert assert_openai_error(r, 404)["code"] == "job_not_found"
    r = await api.http.post("/v1/results/poll", json={"ids": [job["id"]]}, headers=theirs)
    assert r.json()["data"] == []
    mine = await api.http.get(f"/v1/jobs/{job['id']}", headers=api.h(api.client))
    assert mine.json()["status"] == "queued"


async def test_node_cannot_use_another_node_keys_node_id(api: Api) -> None:
    job = await api.submit()
    node_id = await api.register(["echo"])
    other = (
        await api.http.post("/v1/admin/keys", json={"role": "node"}, headers=api.h(api.admin))
    ).json()["key"]
    for path, body in [
        ("/internal/queue/fetch", {"node_id": node_id, "models": ["echo"]}),
        ("/internal/queue/heartbeat", {"node_id": node_id, "lease_ids": []}),
    ]:
        r = await api.http.post(path, json=body, headers=api.h(other))
        assert assert_openai_error(r, 404)["param"] == "node_id"
    r = await api.http.get(f"/v1/jobs/{job['id']}", headers=api.h(api.client))
    assert (r.json()["status"], r.json()["attempts"]) == ("queued", 0)


async def test_rate_limit_is_429_with_retry_after(make_api: Any) -> None:
    async with make_api(rate_limit="3/minute") as api:
        ids = [(await api.submit(str(i)))["id"] for i in range(3)]
        r = await api.http.post(
            "/v1/chat/completions", json=CHAT, headers=api.h(api.client, Prefer="respond-async")
        )
        assert assert_openai_error(r, 429)["code"] == "rate_limit_exceeded"
        assert int(r.headers["retry-after"]) >= 1
        other = await api.http.get("/v1/jobs", headers=api.h(api.other_client))
        assert other.status_code == 200
        assert [j["id"] for j in await snapshot(api)] == ids[::-1]


async def test_active_job_limit_is_429(make_api: Any) -> None:
    async with make_api(max_active_jobs_per_key=3, rate_limit="") as api:
        ids = [(await api.submit(str(i)))["id"] for i in range(3)]
        headers = api.h(api.client, Prefer="respond-async")
        r = await api.http.post("/v1/chat/completions", json=CHAT, headers=headers)
        error = assert_openai_error(r, 429)
        assert error["code"] == "too_many_active_jobs"
        assert int(r.headers["retry-after"]) >= 1
        r = await api.http.post("/v1/jobs", json={"jobs": [{"body": CHAT}]}, headers=headers)
        assert assert_openai_error(r, 429)["code"] == "too_many_active_jobs"
        r = await api.http.post("/v1/jobs", json={"body": CHAT}, headers=api.h(api.other_client))
        assert r.status_code == 202
        await api.http.post(f"/v1/jobs/{ids[0]}/cancel", headers=api.h(api.client))
        r = await api.http.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert r.status_code == 202


async def test_bulk_over_max_jobs_per_request(make_api: Any) -> None:
    async with make_api(max_jobs_per_request=2, rate_limit="") as api:
        r = await api.http.post(
            "/v1/jobs", json={"jobs": [{"body": CHAT}] * 3}, headers=api.h(api.client)
        )
        assert assert_openai_error(r, 400)["param"] == "jobs"
        assert await snapshot(api) == []
        r = await api.http.post(
            "/v1/jobs", json={"jobs": [{"body": CHAT}] * 2}, headers=api.h(api.client)
        )
        assert r.status_code == 202


# -- random bodies -----------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([2**63, -(2**63) - 1, 10**30, 1e300])  # beyond 64 bits
    | st.floats()  # NaN and Infinity too: Python's JSON parser takes them
    | st.text(max_size=8)
    | st.sampled_from(["echo", "user", "/v1/completions", "job_x", "node_x"])
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
# route -> (a valid body, the path of a nested object worth spoiling too)
TEMPLATES: dict[str, tuple[dict[str, Any], tuple[str | int, ...]]] = {
    CC: (CHAT, ()),
    "/v1/completions": ({"model": "echo", "prompt": "hi"}, ()),
    "/v1/responses": (
        {
            "model": "echo",
            "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
        },
        ("input", 0),
    ),
    JOBS: ({"body": CHAT}, ("body",)),
    POLL: ({"ids": ["job_x"]}, ()),
    REGISTER: ({"name": "n", "models": [{"name": "echo"}]}, ("models", 0)),
    FETCH: (ANY_FETCH, ()),
    BEAT: ({"node_id": "n", "stats": {}}, ("stats",)),
    SUBMIT: ({"results": [{"job_id": "j", "lease_id": "l", "result": {}}]}, ("results", 0)),
    BATCHES: (batch(), ()),
    TEMPLATES_URL: (template(), ("streams", 0)),
}
KNOBS = ["priority", "max_attempts", "expires_at", "ttl_seconds", "metadata", "custom_id"]
KNOBS += ["seed", "temperature", "stream", "error", "extra", "settings", "template"]


@st.composite
def bodies(draw: Any, route: str) -> Any:
    """Any JSON at all, or (more often) a valid body with one field, maybe nested, set to
    any JSON."""
    if draw(st.integers(0, 3)) == 0:
        return draw(values)
    template, nested = TEMPLATES[route]
    body = copy.deepcopy(template)
    target = body
    if nested and draw(st.booleans()):
        for step in nested:
            target = target[step]
    target[draw(st.sampled_from(sorted({*target, *KNOBS})))] = draw(scalars | values)
    return body


def test_random_bodies_never_500_and_both_paths_agree() -> None:
    """Random JSON at the main POST routes: a 2xx, or a 4xx in OpenAI's shape, and the
    same answer with the fast lane on and off (status, and the whole error)."""
    loop = asyncio.new_event_loop()
    with tempfile.TemporaryDirectory() as tmp:
        servers = [
            serve_in_process(
                Path(tmp) / str(lane),
                rate_limit="",
                max_poll_wait_seconds=0.01,
                model_wait_seconds=0,
                fast_lane=lane,
            )
            for lane in (True, False)
        ]
        apis: list[Api] = [loop.run_until_complete(s.__aenter__()) for s in servers]
        try:

            @settings(
                max_examples=600,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            )
            @given(data=st.data())
            def check(data: Any) -> None:
                route = data.draw(st.sampled_from(sorted(TEMPLATES)), label="route")
                body = json.dumps(data.draw(bodies(route), label="body")).encode()
                answers = []
                for api in apis:
                    key = api.node if route.startswith("/internal") else api.client
                    headers = api.h(
                        key, Prefer="respond-async", **{"content-type": "application/json"}
                    )
                    r = loop.run_until_complete(api.http.post(route, content=body, headers=headers))
                    assert r.status_code < 500, r.text
                    if r.status_code >= 400:
                        assert_openai_error(r, r.status_code)
                    answers.append((r.status_code, r.json() if r.status_code >= 400 else None))
                assert answers[0] == answers[1]

            check()
        finally:
            for server in servers:
                loop.run_until_complete(server.__aexit__(None, None, None))
            loop.close()


async def test_file_upload_mistakes(make_api: Any) -> None:
    async with make_api(rate_limit="", max_file_bytes=2000, max_batch_lines=3) as api:
        line = {"custom_id": "a", "method": "POST", "url": CC, "body": CHAT}

        async def upload(content: bytes, purpose: str | None = "batch") -> Any:
            data = {} if purpose is None else {"purpose": purpose}
            files = {"file": ("in.jsonl", content, "application/jsonl")}
            return await api.http.post(FILES, data=data, files=files, headers=api.h(api.client))

        ok = json.dumps(line).encode()
        assert_openai_error(await upload(ok, purpose=None), 400)
        assert_openai_error(await upload(b""), 400)
        assert_openai_error(await upload(b"x" * 3000, purpose="user_data"), 413)
        four = b"\n".join(json.dumps({**line, "custom_id": str(i)}).encode() for i in range(4))
        error = assert_openai_error(await upload(four), 400)
        assert error["code"] == "too_many_lines"
        r = await api.http.post(
            FILES,
            content=b"--x\r\nnot really multipart",
            headers=api.h(api.client, **{"content-type": "multipart/form-data"}),
        )
        assert_openai_error(r, 400)
        listed = await api.http.get(FILES, headers=api.h(api.client))
        assert listed.json()["data"] == []  # nothing half-stored
        r = await upload(ok)
        assert r.status_code == 200 and r.json()["bytes"] == len(ok)
