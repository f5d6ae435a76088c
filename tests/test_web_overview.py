"""The Overview page in a real Chromium: per-model counts that change while jobs are
submitted from outside (no reload), the charts, the live stream's login, dark mode."""

from __future__ import annotations

from typing import Any

import httpx

from tests.browser import PHONE, Site, tab
from tests.nodes import cancel_job, get_job, submit_chat, wait_until


def _count(t: Any, selector: str) -> int:
    return int(t.page.inner_text(selector).strip())


def test_the_counts_change_live_while_jobs_are_submitted_from_outside(
    chrome: Any, web: Site
) -> None:
    with tab(chrome, web.url) as t:
        t.login(web.key("client"), then="/")
        t.page.evaluate("window.__kept = 'no reload'")
        t.page.wait_for_function("() => window.OBB_OVERVIEW && window.OBB_OVERVIEW.updates >= 1")
        assert t.page.inner_text("#live-status") == "live"
        assert t.page.inner_text("tr[data-model=echo] td:nth-child(6)").strip() == "1"
        done_before = _count(t, "#total-completed")
        # from outside: jobs no node serves stay queued; echo jobs complete
        parked = [
            submit_chat(web.server, f"parked {i}", model="nobody-serves-this") for i in range(3)
        ]
        echoed = [submit_chat(web.server, f"echo {i}") for i in range(4)]
        t.page.wait_for_selector("tr[data-model=nobody-serves-this]")
        assert t.page.inner_text("tr[data-model=nobody-serves-this] td:nth-child(2)") == "3"
        assert _count(t, "#total-queued") >= 3
        wait_until(
            lambda: all(get_job(web.server, j)["status"] == "completed" for j in echoed),
            10,
            "echo jobs to complete",
        )
        t.page.wait_for_function(
            "n => Number(document.querySelector('#total-completed').textContent) >= n",
            arg=done_before + 4,
        )
        for job_id in parked:
            cancel_job(web.server, job_id)
        t.page.wait_for_function(
            "() => !document.querySelector('tr[data-model=nobody-serves-this] td:nth-child(2)')"
            " || document.querySelector('tr[data-model=nobody-serves-this] td:nth-child(2)')"
            ".textContent.trim() === '0'"
        )
        assert t.page.evaluate("window.__kept") == "no reload"
        # the charts: two uPlot canvases, and the finished jobs in the throughput series
        assert t.page.locator(".chart canvas").count() == 2
        t.page.wait_for_function(
            "() => window.OBB_OVERVIEW.charts.throughput.columns[1].some(v => v > 0)"
        )
        assert t.page.locator(".chart .u-legend").first.is_visible()
        t.page.set_viewport_size(PHONE)  # the charts follow the width
        t.page.wait_for_function(
            "() => [...document.querySelectorAll('.chart .uplot')]"
            ".every(u => u.getBoundingClientRect().right <= window.innerWidth)"
        )
        t.shot("overview")
        t.assert_clean()


def test_dark_mode_and_a_phone_screen(chrome: Any, web: Site) -> None:
    with tab(chrome, web.url, viewport={"width": 375, "height": 812}, dark=True) as t:
        t.login(web.key("admin"), then="/")
        t.page.wait_for_function("() => window.OBB_OVERVIEW && window.OBB_OVERVIEW.updates >= 1")
        width = t.page.evaluate("document.documentElement.scrollWidth")
        assert width <= 375, f"the page scrolls sideways: {width} px"
        background = t.page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background != "rgb(255, 255, 255)"
        t.shot("overview-dark")
        t.assert_clean()


def test_the_event_stream_needs_a_login_and_sends_history_then_counts(web: Site) -> None:
    with httpx.Client(base_url=web.url) as anonymous:
        r = anonymous.get("/overview/events")
        assert r.status_code == 303 and r.headers["location"].startswith("/login")
    with httpx.Client(base_url=web.url, timeout=10) as client:
        form = client.get("/login")
        token = form.text.split('name="csrf_token" value="')[1].split('"')[0]
        client.post("/login", data={"csrf_token": token, "api_key": web.key("client")})
        names: list[str] = []
        with client.stream("GET", "/overview/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    names.append(line.removeprefix("event: "))
                if len(names) >= 4:
                    break
        assert names[:4] == ["history", "counts", "points", "counts"]
