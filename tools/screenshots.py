#!/usr/bin/env python3
"""The README's screenshots of the web interface (docs/img/*.png), at 1280 px wide.

Starts a real server with an echo node (tests/browser.py's helpers), gives it some work
(jobs from two keys, a batch, a chat answer), and photographs each page in Debian's
Chromium. Run from the repository's root: `.venv/bin/python tools/screenshots.py`.
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tests.conftest  # noqa: E402, F401  (first: it imports tests.browser last)
from tests.browser import browser, site, tab  # noqa: E402
from tests.nodes import auth  # noqa: E402

OUT = ROOT / "docs" / "img"
VIEW = {"width": 1280, "height": 860}


def give_work(url: str, key: str) -> str:
    """Some finished jobs, a few queued for a model no node serves, and a batch."""
    h = auth(key)
    for i in range(12):
        body = {"model": "echo", "messages": [{"role": "user", "content": f"label item {i}"}]}
        httpx.post(url + "/v1/chat/completions", json=body, headers=h, timeout=30)
    for i in range(3):
        body = {"model": "qwen2.5-7b", "messages": [{"role": "user", "content": f"q {i}"}]}
        httpx.post(
            url + "/v1/chat/completions",
            json=body,
            headers={**h, "Prefer": "respond-async"},
            timeout=30,
        )
    lines = [
        json.dumps(
            {
                "custom_id": f"row-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "echo", "messages": [{"role": "user", "content": f"r{i}"}]},
            }
        )
        for i in range(40)
    ]
    files = {"file": ("eval.jsonl", io.BytesIO("\n".join(lines).encode()), "application/json")}
    up = httpx.post(url + "/v1/files", data={"purpose": "batch"}, files=files, headers=h).json()
    batch = httpx.post(
        url + "/v1/batches",
        json={
            "input_file_id": up["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
        headers=h,
    ).json()
    return str(batch["id"])


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, site(Path(tmp), delay_ms=5) as web:
        give_work(web.url, web.key("client"))
        time.sleep(4)  # the batch runs, the overview's sampler sees the finished jobs
        with browser() as chrome, tab(chrome, web.url, viewport=VIEW) as t:
            t.login(web.key("admin"))
            t.page.wait_for_timeout(5000)
            t.page.screenshot(path=str(OUT / "overview.png"))
            t.go("/nodes")
            t.page.wait_for_timeout(1000)
            t.page.screenshot(path=str(OUT / "nodes.png"))
            t.go("/jobs")
            t.page.screenshot(path=str(OUT / "jobs.png"))
            t.go("/batches")
            t.page.screenshot(path=str(OUT / "batches.png"))
            t.go("/chat")
            t.page.wait_for_selector("#chat-model option[value=echo]", state="attached")
            t.page.fill(
                "#chat-prompt",
                "Queues in **three** points:\n\n- submit now\n- collect later\n- lose nothing",
            )
            t.page.click("#chat-send")
            t.page.wait_for_selector("#chat-stop[disabled]", timeout=30_000)
            t.page.wait_for_timeout(500)
            t.page.screenshot(path=str(OUT / "chat.png"))
    for png in sorted(OUT.glob("*.png")):
        print(png.relative_to(ROOT))


if __name__ == "__main__":
    main()
