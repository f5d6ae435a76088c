"""The happy path through the HTTP API, in-process."""

from tests.conftest import Api


async def test_submit_fetch_complete(api: Api) -> None:
    job = await api.submit("hello")
    node_id = await api.register(["echo"])
    r = await api.http.post(
        "/internal/queue/fetch",
        json={"node_id": node_id, "models": ["echo"], "max_jobs": 5},
        headers=api.h(api.node),
    )
    leased = r.json()["jobs"]
    assert [j["id"] for j in leased] == [job["id"]]
    result = {"object": "chat.completion", "choices": [{"message": {"content": "hello"}}]}
    r = await api.http.post(
        "/internal/queue/submit",
        json={"results": [{"job_id": job["id"], "lease_id": leased[0]["lease_id"], "result": result}]},
        headers=api.h(api.node),
    )
    assert r.json()["results"][0]["accepted"] is True
    r = await api.http.get(f"/v1/jobs/{job['id']}", headers=api.h(api.client))
    assert r.json()["status"] == "completed"
    assert r.json()["result"] == result
