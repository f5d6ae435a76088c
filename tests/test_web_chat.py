"""The Chat page in a real Chromium: answers streamed piece by piece, whole, or as a job
followed through its events; Stop cancels the job; Markdown rendered and sanitized;
the conversation's earlier turns sent with each message; the API's errors shown."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.browser import PHONE, Site, Tab, tab
from tests.nodes import (
    Procs,
    auth,
    echo_model,
    get_job,
    new_server,
    node_id_of,
    start_node,
    wait_until,
    write_config,
)

WORDS = " ".join(f"word{i}" for i in range(40))
TOKEN_DELAY_MS = 25


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """The shared fixture's site, but its echo node pauses between words (the shared
    one pauses only before the first): answers arrive word by word, slowly enough to
    watch and to stop."""
    data_dir = tmp_path_factory.mktemp("web-chat")
    server = new_server(data_dir / "server")
    procs = Procs()
    try:
        model = echo_model(20, token_delay_ms=TOKEN_DELAY_MS)
        config = write_config(data_dir / "node" / "node.toml", server, [model])
        yield Site(server=server, procs=procs, node_id=node_id_of(start_node(procs, config)))
    finally:
        procs.close()
        server.kill()


COUNT_UPDATES = """() => {
  window.__lengths = [];
  const log = document.getElementById('chat-log');
  new MutationObserver(() => {
    const answer = log.querySelector('.msg.assistant:last-child .answer');
    if (answer) window.__lengths.push(answer.textContent.length);
  }).observe(log, {childList: true, subtree: true, characterData: true});
}"""


def _chat(t: Tab, key: str) -> None:
    """Logged in with `key`, on /chat with the echo model picked."""
    t.login(key, then="/chat")
    t.page.wait_for_selector("#chat-model option[value=echo]", state="attached")
    assert t.page.input_value("#chat-model") == "echo"


def _answered(t: Tab, n: int = 1) -> Any:
    """The n-th answer, once it is complete."""
    selector = f"#chat-log .msg.assistant:nth-child({2 * n})"
    t.page.wait_for_selector(selector + ":not([aria-busy])")
    return t.page.locator(selector)


def test_a_streamed_answer_appears_piece_by_piece_as_markdown(chrome: Any, web: Site) -> None:
    with tab(chrome, web.url, viewport=PHONE) as t:
        _chat(t, web.key("client"))
        sent: list[dict[str, Any]] = []
        t.page.on(
            "request",
            lambda r: (
                sent.append(json.loads(r.post_data or "{}"))
                if r.url.endswith("/v1/chat/completions")
                else None
            ),
        )
        t.page.evaluate(COUNT_UPDATES)
        t.page.fill("#chat-system", "Be brief.")
        t.page.fill("#chat-max-tokens", "100")
        t.page.fill("#chat-temperature", "0.5")
        t.page.fill("#chat-prompt", f"**bold** {WORDS}")
        t.page.press("#chat-prompt", "Enter")  # Enter sends
        t.page.wait_for_selector("#chat-stop:not([disabled])")
        answer = _answered(t)
        lengths = t.page.evaluate("window.__lengths")
        growing = sorted(set(lengths))
        assert len(growing) >= 5, f"the answer did not grow piece by piece: {lengths}"
        assert growing[0] < growing[-1] / 2
        assert answer.locator(".answer strong").inner_text() == "bold"
        assert answer.locator(".answer").inner_text().endswith("word39")
        job_href = answer.locator("a.job").get_attribute("href")
        assert job_href and job_href.startswith("/jobs/job_")
        assert "tokens" in answer.locator(".meta").inner_text()
        assert sent[0]["stream"] is True and sent[0]["max_tokens"] == 100
        assert sent[0]["temperature"] == 0.5
        assert sent[0]["messages"][0] == {"role": "system", "content": "Be brief."}
        # Shift+Enter is a new line; the second turn carries the first
        t.page.fill("#chat-prompt", "second")
        t.page.press("#chat-prompt", "Shift+Enter")
        t.page.type("#chat-prompt", "line")
        assert t.page.input_value("#chat-prompt") == "second\nline"
        assert t.page.locator("#chat-log .msg.user").count() == 1
        t.page.click("#chat-send")
        assert "second" in _answered(t, 2).locator(".answer").inner_text()
        roles = [m["role"] for m in sent[1]["messages"]]
        assert roles == ["system", "user", "assistant", "user"]
        assert sent[1]["messages"][2]["content"] == f"**bold** {WORDS}"
        no_sideways = "document.documentElement.scrollWidth <= window.innerWidth"
        assert t.page.evaluate(no_sideways)
        t.shot("chat")
        # New chat forgets the conversation
        t.page.click("#chat-new")
        assert t.page.locator("#chat-log .msg").count() == 0
        t.assert_clean()


def test_an_answer_asked_for_whole_and_html_in_it_stays_text(chrome: Any, web: Site) -> None:
    with tab(chrome, web.url) as t:
        _chat(t, web.key("client"))
        t.page.uncheck("#chat-stream")
        attack = '<img src=x onerror="window.__xss=1"> <script>window.__xss=2</script> *fine*'
        t.page.fill("#chat-prompt", attack)
        t.page.click("#chat-send")
        answer = _answered(t)
        assert "<img src=x" in answer.locator(".answer").inner_text()
        assert answer.locator(".answer em").inner_text() == "fine"
        assert t.page.locator("#chat-log img, #chat-log script").count() == 0
        assert t.page.evaluate("window.__xss") is None
        assert answer.locator("a.job").count() == 1
        t.assert_clean()


def _running(web: Site) -> bool:
    r = httpx.get(
        web.url + "/v1/jobs?status=in_progress", headers=auth(web.key("client")), timeout=10
    )
    return any((j["custom_id"] or "").startswith("chat-") for j in r.json()["data"])


@pytest.mark.parametrize("mode", ["stream", "whole", "job"])
def test_stop_cancels_the_job(chrome: Any, web: Site, mode: str) -> None:
    with tab(chrome, web.url) as t:
        _chat(t, web.key("client"))
        if mode == "whole":
            t.page.uncheck("#chat-stream")
        if mode == "job":
            t.page.check("#chat-as-job")
        t.page.fill("#chat-prompt", " ".join(f"w{i}" for i in range(400)))  # ~10 s
        t.page.click("#chat-send")
        if mode == "whole":  # nothing shows before the end: wait for the job to run
            wait_until(lambda: _running(web), 10, "the chat's job to start")
        else:
            t.page.wait_for_function(
                "() => document.querySelector('#chat-log .answer')?.textContent.length > 20"
            )
        t.page.click("#chat-stop")
        answer = t.page.locator("#chat-log .msg.assistant")
        t.page.wait_for_selector("#chat-log .msg.assistant:not([aria-busy])")
        assert "the job was cancelled" in answer.locator(".meta").inner_text()
        assert t.page.inner_text("#chat-status") == "Stopped."
        job_id = answer.locator("a.job").inner_text()
        assert get_job(web.server, job_id)["status"] == "cancelled"
        assert not t.page.is_disabled("#chat-send")
        t.assert_clean()


def test_a_job_shows_its_id_events_and_answer(chrome: Any, web: Site) -> None:
    with tab(chrome, web.url) as t:
        _chat(t, web.key("client"))
        t.page.check("#chat-as-job")
        assert t.page.is_disabled("#chat-stream")
        t.page.fill("#chat-prompt", f"as a job {WORDS}")
        t.page.click("#chat-send")
        link = t.page.locator("#chat-log a.job")
        link.wait_for()
        job_id = link.inner_text()
        answer = _answered(t)
        assert answer.locator(".answer").inner_text() == f"as a job {WORDS}"
        events = answer.locator(".events li").all_inner_texts()
        assert events[0].startswith("queued") and events[1].startswith("started on node_")
        assert events[-1].startswith("end: 43 tokens")
        assert link.get_attribute("href") == f"/jobs/{job_id}"
        assert get_job(web.server, job_id)["status"] == "completed"
        t.assert_clean()


def test_the_apis_errors_are_shown(chrome: Any, web: Site) -> None:
    with tab(chrome, web.url) as t:
        _chat(t, web.key("client"))
        t.page.fill("#chat-temperature", "7")
        t.page.fill("#chat-prompt", "hello")
        t.page.click("#chat-send")
        assert "Temperature" in t.page.inner_text("#chat-error")
        t.page.fill("#chat-temperature", "")
        t.page.evaluate(
            "document.getElementById('chat-model').add(new Option('nope', 'nope', true, true))"
        )
        t.page.click("#chat-send")
        t.page.wait_for_selector("#chat-log .msg.assistant:not([aria-busy])")
        error = t.page.inner_text("#chat-error")
        assert "nope" in error, error
        assert t.page.input_value("#chat-prompt") == "hello"  # given back to retry
        # the failed request's 404 is the only console line
        assert all("404" in e for e in t.errors), t.errors
