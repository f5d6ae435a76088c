"""The Jobs pages in a real Chromium: the list's filters and pages, a job's answer and
timings, live updates while it runs, cancel and re-run, and a client key that never sees
another key's jobs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from tests.browser import Site, site, tab
from tests.nodes import wait_jobs
from tests.web_jobs_helpers import fits_a_phone, job, new_client_key, slow_node, submit


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """A site of this module's own, not the shared one: the jobs it leaves queued and its
    second node are not for other modules' pages to show."""
    with site(tmp_path_factory.mktemp("web-jobs"), delay_ms=20) as started:
        yield started


@pytest.fixture(scope="module")
def slow(web: Site, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with slow_node(web, tmp_path_factory.mktemp("slow")) as node_id:
        yield node_id


def test_a_job_page_shows_its_answer_and_timings(chrome: Any, web: Site) -> None:
    client = web.key("client")
    job_id = submit(web, client, "the answer is forty two", temperature=0.5)
    wait_jobs(web.server, [job_id], "completed", 15)
    with tab(chrome, web.url) as t:
        t.login(client, then=f"/jobs/{job_id}")
        expect(t.page.locator("#job-status")).to_have_text("completed")
        expect(t.page.locator("#job-answer")).to_have_text("the answer is forty two")
        for step in ("queued", "started", "finished"):
            row = t.page.locator(f"#job-timings tr[data-step={step}]")
            expect(row.locator("time")).to_have_text(_UTC)
        assert t.page.locator("#job-timings tr[data-step=finished] td.num").inner_text()
        assert '"temperature": 0.5' in t.page.inner_text("#request-json")
        assert t.page.locator("#job-node").inner_text().strip() != "none yet"
        t.page.click("text=Full result (JSON)")
        expect(t.page.locator("#result-json")).to_contain_text('"finish_reason"')
        t.shot("job")
        fits_a_phone(t)
        t.assert_clean()


_UTC = __import__("re").compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ$")


def test_a_running_job_turns_completed_without_reload(chrome: Any, web: Site, slow: str) -> None:
    client = web.key("client")
    words = " ".join(f"w{i}" for i in range(50))  # 50 words, 100 ms each
    job_id = submit(web, client, words, model="slow")
    with tab(chrome, web.url) as t:
        t.login(client, then=f"/jobs/{job_id}")
        t.page.evaluate("window.__same_page = true")
        # pieces arrive while it runs, then the final state replaces the live one
        t.page.wait_for_function(
            "() => document.getElementById('job-status').textContent === 'in_progress'"
            " && document.getElementById('job-answer').textContent.startsWith('w0 w1')"
        )
        expect(t.page.locator("#job-status")).to_have_text("completed", timeout=20_000)
        expect(t.page.locator("#job-answer")).to_have_text(words)
        expect(t.page.locator("#job-timings tr[data-step=finished] time")).to_have_text(_UTC)
        assert t.page.evaluate("window.__same_page") is True
        expect(t.page.locator("#cancel-job")).to_have_count(0)
        t.assert_clean()


def test_cancel_from_the_page_cancels_the_job(chrome: Any, web: Site) -> None:
    client = web.key("client")
    job_id = submit(web, client, "never served", model="nobody-serves-this")
    with tab(chrome, web.url) as t:
        t.login(client, then=f"/jobs/{job_id}")
        expect(t.page.locator("#job-status")).to_have_text("queued")
        t.page.click("#cancel-job")
        expect(t.page.locator("#job-status")).to_have_text("cancelled")
        assert job(web, client, job_id)["status"] == "cancelled"
        t.assert_clean()


def test_rerun_makes_a_new_job_with_the_same_request(chrome: Any, web: Site) -> None:
    client = web.key("client")
    job_id = submit(web, client, "say it again", max_tokens=50, metadata={"run": "1"})
    wait_jobs(web.server, [job_id], "completed", 15)
    with tab(chrome, web.url) as t:
        t.login(client, then=f"/jobs/{job_id}")
        before = t.page.inner_text("#request-json")
        t.page.click("#rerun-job")
        t.page.wait_for_url(lambda url: "/jobs/" in url and job_id not in url)
        new_id = t.page.url.rsplit("/", 1)[1]
        expect(t.page.locator("#job-status")).to_have_text("completed")
        assert t.page.inner_text("#request-json") == before
        expect(t.page.locator("#job-answer")).to_have_text("say it again")
        again = job(web, client, new_id)  # the client's own job: the API shows it
        assert again["model"] == "echo" and again["metadata"] == {"run": "1"}
        t.assert_clean()


def test_filters_and_pages(chrome: Any, web: Site) -> None:
    bee = new_client_key(web, "bee")
    done = [submit(web, bee["key"], f"job {i}") for i in range(5)]
    waiting = [submit(web, bee["key"], f"wait {i}", model="nobody-serves-this") for i in range(2)]
    for job_id in done:
        _wait_status(web, bee["key"], job_id, "completed")
    newest_first = waiting[::-1] + done[::-1]
    with tab(chrome, web.url) as t:
        t.login(bee["key"], then="/jobs?limit=3")
        assert _rows(t) == newest_first[:3]
        t.page.click("text=Older →")
        expect(t.page.locator("#jobs-table tbody tr").first).to_have_attribute(
            "data-job", newest_first[3]
        )
        assert "after=" in t.page.url and _rows(t) == newest_first[3:6]
        t.page.click("text=Older →")
        expect(t.page.locator("#jobs-table tbody tr")).to_have_count(1)
        expect(t.page.locator("text=Older →")).to_have_count(0)
        t.page.click("text=← Newest")
        expect(t.page.locator("#jobs-table tbody tr")).to_have_count(3)
        # a filter swaps the table in place and lands in the URL
        t.go("/jobs")
        t.page.select_option("select[name=status]", "queued")
        t.page.wait_for_url("**/jobs?status=queued*")
        expect(t.page.locator("#jobs-table tbody tr")).to_have_count(2)
        assert _rows(t) == waiting[::-1]
        t.shot("jobs")
        fits_a_phone(t)
        # plain GETs work too (shared URLs)
        t.go("/jobs?model=nobody-serves-this&range=1h")
        assert _rows(t) == waiting[::-1]
        t.go("/jobs?to=2000-01-01T00:00")
        expect(t.page.locator("#no-jobs")).to_contain_text("match these filters")
        t.go("/jobs?from=2000-01-01T00:00:00&status=completed&limit=2")
        assert _rows(t) == done[::-1][:2]
        t.assert_clean()
    # bad filter values: a clear message and a 400, not a 500
    with httpx.Client(base_url=web.url) as plain:
        for query, words in [
            ("status=bogus", "unknown status"),
            ("from=yesterday", "date and time"),
            ("limit=0", "a number from 1 to 200"),
            ("range=1y", "time range"),
            ("after=job_nope", "unknown cursor"),
            ("from=2026-01-02T00:00&to=2026-01-01T00:00", "must come before"),
        ]:
            r = _logged_in(plain, web, bee["key"]).get(f"/jobs?{query}")
            assert r.status_code == 400 and words in r.text, (query, r.status_code)


def test_a_client_never_sees_another_keys_jobs(chrome: Any, web: Site) -> None:
    wasp = new_client_key(web, "wasp")
    theirs = submit(web, wasp["key"], "private words")
    mine = submit(web, web.key("client"), "my words")
    with tab(chrome, web.url) as t:
        t.login(web.key("client"), then="/jobs?limit=200")
        ids = _rows(t)
        assert mine in ids and theirs not in ids
        t.go(f"/jobs?key={wasp['id']}&limit=200")  # a client's key filter is its own
        assert theirs not in _rows(t)
        response = t.go(f"/jobs/{theirs}")
        assert response.status == 404
        assert "private words" not in t.page.content()
    with tab(chrome, web.url) as t:
        t.login(web.key("admin"), then=f"/jobs?key={wasp['id']}")
        assert _rows(t) == [theirs]
        expect(t.page.locator(f"tr[data-job={theirs}]")).to_contain_text("wasp")
        t.go(f"/jobs/{theirs}")
        expect(t.page.locator("#job-answer")).to_have_text("private words")
        t.assert_clean()


def _rows(t: Any) -> list[str]:
    return [str(r.get_attribute("data-job")) for r in t.page.locator("#jobs-table tbody tr").all()]


def _wait_status(web: Site, key: str, job_id: str, status: str) -> None:
    from tests.nodes import wait_until

    wait_until(lambda: job(web, key, job_id)["status"] == status, 15, f"{job_id} {status}")


def _logged_in(client: httpx.Client, web: Site, key: str) -> httpx.Client:
    if "obb_session" not in client.cookies:
        form = client.get("/login").text
        token = form.split('name="csrf_token" value="')[1].split('"')[0]
        client.post("/login", data={"csrf_token": token, "api_key": key})
    return client
