"""The Batches pages in a real Chromium: progress that moves while the batch runs, its
output file downloaded with its lines, cancel, and a client key that never sees another
key's batches."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from tests.browser import Site, site, tab
from tests.nodes import auth
from tests.web_jobs_helpers import (
    batch,
    chat_line,
    fits_a_phone,
    new_client_key,
    slow_node,
    start_batch,
)


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """A site of this module's own, not the shared one: the jobs it leaves queued and its
    second node are not for other modules' pages to show."""
    with site(tmp_path_factory.mktemp("web-batches"), delay_ms=20) as started:
        yield started


@pytest.fixture(scope="module")
def slow(web: Site, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with slow_node(web, tmp_path_factory.mktemp("slow")) as node_id:
        yield node_id


def _words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def test_a_batch_shows_progress_and_its_output_downloads(chrome: Any, web: Site, slow: str) -> None:
    client = web.key("client")
    # 100 ms a word: the lines end about 1, 3 and 5 s in (or later, one after another)
    lines = [chat_line(f"r{i}", _words(n), model="slow") for i, n in enumerate((10, 30, 50))]
    batch_id = start_batch(web, client, lines)
    with tab(chrome, web.url) as t:
        t.login(client, then=f"/batches/{batch_id}")
        t.page.evaluate("window.__same_page = true")
        status = t.page.locator("#batch-status")
        bar = t.page.locator("#batch-detail progress")
        # seen part-way: some lines done, not all (the fragment is polled every 3 s)
        t.page.wait_for_function(
            "() => { const p = document.querySelector('#batch-detail progress');"
            " return p && p.value >= 1 && p.value < 3 &&"
            " document.getElementById('batch-status').textContent === 'in_progress'; }",
            timeout=20_000,
        )
        expect(status).to_have_text("completed", timeout=30_000)
        assert bar.get_attribute("value") == "3" and bar.get_attribute("max") == "3"
        expect(t.page.locator("#batch-detail [data-count=completed]")).to_have_text("3 completed")
        assert t.page.evaluate("window.__same_page") is True
        with t.page.expect_download() as download:
            t.page.click("#batch-files tr[data-file=output] a")
        assert download.value.suggested_filename == f"{batch_id}_output.jsonl"
        text = Path(download.value.path()).read_text()
        out = [json.loads(x) for x in text.splitlines() if x]
        answers = {
            o["custom_id"]: o["response"]["body"]["choices"][0]["message"]["content"] for o in out
        }
        assert answers == {f"r{i}": _words(n) for i, n in enumerate((10, 30, 50))}
        t.shot("batch")
        fits_a_phone(t)
        t.go("/batches")
        row = t.page.locator(f"[data-batch={batch_id}]")
        expect(row.locator(".status")).to_have_text("completed")
        assert row.locator("progress").get_attribute("value") == "3"
        expect(row.locator("a", has_text="output")).to_have_count(1)
        t.shot("batches")
        fits_a_phone(t)
        t.assert_clean()


def test_cancel_from_the_page_cancels_the_batch(chrome: Any, web: Site) -> None:
    client = web.key("client")
    lines = [chat_line(f"c{i}", "never served", model="nobody-serves-this") for i in range(2)]
    batch_id = start_batch(web, client, lines)
    with tab(chrome, web.url) as t:
        t.login(client, then="/batches")
        row = t.page.locator(f"[data-batch={batch_id}]")
        row.locator("button", has_text="Cancel").click()
        t.page.wait_for_url(web.url + "/batches")
        t.go(f"/batches/{batch_id}")
        expect(t.page.locator("#batch-status")).to_have_text("cancelled", timeout=15_000)
        assert batch(web, client, batch_id)["status"] == "cancelled"
        expect(t.page.locator(".cancel-batch")).to_have_count(0)
        t.assert_clean()


def test_a_client_never_sees_another_keys_batches(chrome: Any, web: Site) -> None:
    hornet = new_client_key(web, "hornet")
    theirs = start_batch(web, hornet["key"], [chat_line("h1", "their line")])
    mine = start_batch(web, web.key("client"), [chat_line("m1", "my line")])
    with tab(chrome, web.url) as t:
        t.login(web.key("client"), then="/batches")
        expect(t.page.locator(f"[data-batch={mine}]")).to_have_count(1)
        expect(t.page.locator(f"[data-batch={theirs}]")).to_have_count(0)
        assert t.go(f"/batches/{theirs}").status == 404
        assert t.go(f"/jobs?batch={theirs}").status == 200
        expect(t.page.locator("#no-jobs")).to_be_visible()
    with tab(chrome, web.url) as t:
        t.login(web.key("admin"), then="/batches")
        row = t.page.locator(f"[data-batch={theirs}]")
        expect(row).to_contain_text("hornet")
        t.go(f"/batches/{theirs}")
        expect(t.page.locator("#batch-status")).to_have_text("completed", timeout=15_000)
        t.assert_clean()


def test_a_file_downloads_under_its_own_name(web: Site) -> None:
    key = web.key("client")
    name = "日本 réponses.jsonl"
    up = httpx.post(
        web.url + "/v1/files",
        headers=auth(key),
        files={"file": (name, json.dumps(chat_line("x", "hi")).encode(), "application/jsonl")},
        data={"purpose": "batch"},
    )
    assert up.status_code == 200, up.text
    r = httpx.get(f"{web.url}/v1/files/{up.json()['id']}/content", headers=auth(key))
    assert r.status_code == 200
    disposition = r.headers["content-disposition"]
    assert disposition.startswith("attachment; ")
    assert "filename*=UTF-8''%E6%97%A5%E6%9C%AC%20r%C3%A9ponses.jsonl" in disposition
    assert 'filename="__ r_ponses.jsonl"' in disposition


def test_a_poll_answers_only_the_live_part(web: Site) -> None:
    key = web.key("client")
    batch_id = start_batch(web, key, [chat_line("p", "waits", model="nobody-serves-this")])
    with httpx.Client(base_url=web.url) as browser:
        token = browser.get("/login").text.split('name="csrf_token" value="')[1].split('"')[0]
        browser.post("/login", data={"csrf_token": token, "api_key": key})
        page = browser.get(f"/batches/{batch_id}")
        assert "<html" in page.text and 'hx-trigger="every 3s"' in page.text
        for path, root in (
            (f"/batches/{batch_id}", "batch-detail"),
            ("/batches", "batches-results"),
        ):
            # opening the page reads afresh (a poll may answer from a read up to 2 s old,
            # made before this batch existed)
            assert browser.get(path).status_code == 200
            poll = browser.get(path, headers={"HX-Request": "true"})
            assert poll.status_code == 200 and "<html" not in poll.text
            assert f'id="{root}"' in poll.text and 'hx-trigger="every 3s"' in poll.text
    httpx.post(f"{web.url}/v1/batches/{batch_id}/cancel", headers=auth(key))
