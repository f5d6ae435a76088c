"""The Swarm page in a real Chromium: two real servers in a swarm (B bootstrapped from
A, an echo node on B), seen from A: both members with their models and load, this
server marked, the DHT peer; live, so that B drops off the page when it is killed. A
server in no swarm says so and how to join; without a login the page is a redirect."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from openbeepboop.server.web.pages import make_templates
from openbeepboop.server.web.swarm import duration, swarm_view
from tests.browser import PHONE, tab
from tests.conftest import ServerProcess
from tests.nodes import (
    Procs,
    auth,
    echo_model,
    new_server,
    node_id_of,
    start_node,
    wait_until,
    write_config,
)

SECRET = "web-swarm-test-secret-0123456789"
HEARTBEAT = "0.5"  # records expire after three: 1.5 s
# a model name as long as a Hugging Face one, for the 375 px check
LONG = {**echo_model(), "name": "bartowski/Meta-Llama-3.1-70B-Instruct-GGUF:Q4_K_M"}


@dataclass
class Pair:
    a: ServerProcess
    b: ServerProcess
    a_id: str
    b_id: str
    b_dht: str


def dht_status(server: ServerProcess) -> dict[str, Any]:
    r = httpx.get(server.url + "/dht/status", headers=auth(server.keys["client_key"]), timeout=5)
    assert r.status_code == 200, r.text
    return dict(r.json())


def swarm_env(name: str, **extra: str) -> dict[str, str]:
    return {
        "OPENBEEPBOOP_DHT_PORT": "0",
        "OPENBEEPBOOP_SWARM_SECRET": SECRET,
        "OPENBEEPBOOP_HEARTBEAT_INTERVAL": HEARTBEAT,
        "OPENBEEPBOOP_SERVER_NAME": name,
        **extra,
    }


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """A, then B joining through A's DHT address with an echo node; A sees B's model."""
    root = tmp_path_factory.mktemp("swarm")
    procs = Procs()
    servers: list[ServerProcess] = []
    try:
        a = new_server(root / "a", **swarm_env("alpha"))
        servers.append(a)
        a_status = dht_status(a)
        b = new_server(root / "b", **swarm_env("beta", OPENBEEPBOOP_BOOTSTRAP=a_status["dht"]))
        servers.append(b)
        config = write_config(root / "node" / "node.toml", b, [echo_model(), LONG])
        node_id_of(start_node(procs, config))
        b_status = dht_status(b)

        def b_serves_echo() -> bool:
            members = {m["id"]: m for m in dht_status(a)["members"]}
            seen = members.get(b_status["id"], {}).get("models", {})
            return seen.get("echo", {}).get("nodes", 0) >= 1

        wait_until(b_serves_echo, 20, "A to see B's record with its echo node")
        yield Pair(a, b, a_status["id"], b_status["id"], b_status["dht"])
    finally:
        procs.close()
        for server in servers:
            server.kill()


def test_members_models_and_peers_live_and_a_killed_member_drops_off(
    chrome: Any, pair: Pair
) -> None:
    a, b = pair.a, pair.b
    with tab(chrome, a.url) as t:
        t.login(a.keys["client_key"], then="/swarm")
        page = t.page
        assert page.locator("nav a[href='/swarm']").get_attribute("aria-current") == "page"
        assert page.inner_text(".self-id") == pair.a_id
        assert re.fullmatch(r"[0-9a-f]{6,}", page.inner_text(".fingerprint"))
        assert re.fullmatch(r"127\.0\.0\.1:\d+", page.inner_text("code.dht"))
        assert int(page.inner_text(".routing")) >= 1
        assert int(page.inner_text(".records")) == 2
        assert page.inner_text(".dropped") == "0" and page.inner_text(".rejected") == "0"

        mine = page.locator(f"article.member[data-member='{pair.a_id}']")
        theirs = page.locator(f"article.member[data-member='{pair.b_id}']")
        assert mine.locator(".label.self").inner_text() == "this server"
        assert theirs.locator(".label.self").count() == 0
        assert mine.locator(".member-name").inner_text() == "alpha"
        assert theirs.locator(".member-name").inner_text() == "beta"
        assert theirs.locator("a.url").get_attribute("href") == b.url
        assert theirs.locator("dd.nodes").inner_text() == "1"
        echo = theirs.locator("tr[data-model=echo] td")
        assert echo.all_inner_texts() == ["0", "0", "1"]  # queued, running, nodes
        assert theirs.locator("tr[data-model]").count() == 2
        assert mine.locator("tr[data-model]").count() == 0  # A has no node
        assert re.search(r"up \d+ (s|min)", theirs.locator("header").inner_text())
        peer = page.locator(f"table.peers tr[data-peer='{pair.b_dht}']")
        assert peer.locator("td").nth(2).inner_text() == "beta"

        # live: the part under the header is swapped in, the page kept
        page.evaluate("() => { window.__kept = 1; }")
        page.evaluate("() => { document.querySelector('article.member').dataset.old = 'yes'; }")
        page.wait_for_selector(f"article.member[data-member='{pair.a_id}']:not([data-old])")
        assert page.evaluate("() => window.__kept") == 1

        page.set_viewport_size(PHONE)
        width = page.evaluate("() => document.documentElement.scrollWidth")
        assert width <= PHONE["width"], f"the page scrolls sideways: {width} px"
        t.shot("swarm")

        b.kill()  # SIGKILL: B stops publishing; its record expires in A's view (1.5 s)
        page.wait_for_selector(
            f"article.member[data-member='{pair.b_id}']", state="detached", timeout=15_000
        )
        page.wait_for_selector(f"article.member[data-member='{pair.a_id}']")
        assert page.inner_text(".records") == "1"
        assert page.evaluate("() => window.__kept") == 1  # no reload
        t.assert_clean()


def test_a_server_in_no_swarm_says_so_and_how_to_join(chrome: Any, tmp_path: Path) -> None:
    server = new_server(tmp_path / "solo")
    try:
        with tab(chrome, server.url, viewport=PHONE) as t:
            t.login(server.keys["client_key"], then="/swarm")
            text = t.page.inner_text("#no-swarm")
            assert "not in a swarm" in text
            for needed in ("--dht-port", "--bootstrap", "OPENBEEPBOOP_SWARM_SECRET", "swarm.md"):
                assert needed in text
            assert t.page.locator("[sse-connect]").count() == 0  # nothing to stream
            width = t.page.evaluate("() => document.documentElement.scrollWidth")
            assert width <= PHONE["width"], f"the page scrolls sideways: {width} px"
            t.shot("swarm-none")
            t.assert_clean()
        r = httpx.get(server.url + "/swarm/events", timeout=5)
        assert r.status_code == 303  # no login: to the login page, as for the page
    finally:
        server.kill()


def test_without_a_login_the_page_redirects_to_the_login_page(pair: Pair) -> None:
    r = httpx.get(pair.a.url + "/swarm", timeout=5)
    assert r.status_code == 303
    assert r.headers["location"] == "/login?next=/swarm"


def test_member_names_and_models_are_escaped_and_durations_read_well() -> None:
    status = {
        "id": "srv_a",
        "swarm": "abc123",
        "dht": "10.0.0.1:7000",
        "heartbeat_interval": 1.0,
        "peers": [{"id": "f" * 40, "host": "10.0.0.2", "port": 7000}],
        "members": [
            {
                "id": "srv_b",
                "name": "<b>bee</b>",
                "url": "http://10.0.0.2:8000",
                "age": 9.0,
                "dht": "10.0.0.2:7000",
                "uptime": 3 * 3600 + 300,
                "models": {"<i>m</i>": {"queued": 4, "running": 2, "nodes": 1}},
            },
            {"id": "srv_a", "name": "zed", "url": "javascript:alert(1)", "age": 0.2},
        ],
    }
    view = swarm_view(status)
    assert [m["id"] for m in view["members"]] == ["srv_a", "srv_b"]  # this server first
    html = make_templates().env.get_template("swarm_live.html").render(swarm=view)
    assert "&lt;b&gt;bee&lt;/b&gt;" in html and "&lt;i&gt;m&lt;/i&gt;" in html
    assert "javascript:" not in html
    assert "up 3 h 5 min" in html and 'class="label late"' in html  # 9 s > 2 heartbeats
    assert "<td>&lt;b&gt;bee&lt;/b&gt;</td>" in html  # the peer named by its DHT address
    assert [duration(s) for s in (0, 59, 61, 7200, 90000)] == [
        "0 s",
        "59 s",
        "1 min",
        "2 h 0 min",
        "1 d 1 h",
    ]
