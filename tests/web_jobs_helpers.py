"""Helpers of the Jobs and Batches page tests: jobs and keys made through the API, and a
second echo node whose model (`slow`) streams a word every 100 ms, so a job stays running
long enough to watch it on a page."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.browser import PHONE, Site, Tab
from tests.nodes import Procs, auth, node_id_of, start_node, write_config

SLOW = {"name": "slow", "backend": "echo", "token_delay_ms": 100}


@contextmanager
def slow_node(web: Site, folder: Path) -> Iterator[str]:
    """A node serving model `slow` on the site's server, for the block."""
    procs = Procs()
    try:
        config = write_config(folder / "slow.toml", web.server, [SLOW])
        yield node_id_of(start_node(procs, config, tag="slow"))
    finally:
        procs.close()


def new_client_key(web: Site, name: str) -> dict[str, Any]:
    """A fresh client key (its `key` secret and `id`), made with the admin key."""
    r = httpx.post(
        web.url + "/v1/admin/keys",
        json={"role": "client", "name": name},
        headers=auth(web.key("admin")),
    )
    assert r.status_code == 201, r.text
    return dict(r.json())


def submit(web: Site, key: str, content: str, model: str = "echo", **body: Any) -> str:
    """Queue a chat job with `key`; its id."""
    request = {"model": model, "messages": [{"role": "user", "content": content}], **body}
    r = httpx.post(
        web.url + "/v1/chat/completions",
        json=request,
        headers=auth(key, Prefer="respond-async"),
        timeout=10,
    )
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def job(web: Site, key: str, job_id: str) -> dict[str, Any]:
    r = httpx.get(f"{web.url}/v1/jobs/{job_id}", headers=auth(key), timeout=10)
    assert r.status_code == 200, r.text
    return dict(r.json())


def start_batch(web: Site, key: str, lines: list[dict[str, Any]]) -> str:
    """Upload `lines` as a JSONL file (purpose batch) and run it as a batch; its id."""
    text = "\n".join(json.dumps(line) for line in lines) + "\n"
    r = httpx.post(
        web.url + "/v1/files",
        headers=auth(key),
        files={"file": ("questions.jsonl", text.encode(), "application/jsonl")},
        data={"purpose": "batch"},
    )
    assert r.status_code == 200, r.text
    r = httpx.post(
        web.url + "/v1/batches",
        headers=auth(key),
        json={"input_file_id": r.json()["id"], "endpoint": "/v1/chat/completions"},
    )
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def chat_line(custom_id: str, content: str, model: str = "echo") -> dict[str, Any]:
    """One line of a batch input file."""
    body = {"model": model, "messages": [{"role": "user", "content": content}]}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def batch(web: Site, key: str, batch_id: str) -> dict[str, Any]:
    r = httpx.get(f"{web.url}/v1/batches/{batch_id}", headers=auth(key), timeout=10)
    assert r.status_code == 200, r.text
    return dict(r.json())


def fits_a_phone(t: Tab) -> None:
    """At 375 px wide the page does not scroll sideways (tables scroll in their box)."""
    before = t.page.viewport_size
    t.page.set_viewport_size(PHONE)
    try:
        width = t.page.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"], f"{t.page.url} is {width} px wide at 375 px"
    finally:
        if before:
            t.page.set_viewport_size(before)
