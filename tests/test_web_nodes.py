"""The Nodes page in a real Chromium: the echo node with its model and state, a live
"s ago" for its last heartbeat, swapped in over Server-Sent Events without a reload."""

from __future__ import annotations

import re
from typing import Any

from openbeepboop.server.models import Node
from openbeepboop.server.web.nodes import node_view
from openbeepboop.server.web.pages import make_templates
from tests.browser import Site, tab


def test_the_echo_node_shows_its_model_state_and_a_live_heartbeat(chrome: Any, web: Site) -> None:
    with tab(chrome, web.url, viewport={"width": 375, "height": 812}) as t:
        t.login(web.key("client"), then="/nodes")
        node = t.page.locator(f"article.node[data-node='{web.node_id}']")
        assert node.locator("tr[data-model=echo] .state").inner_text() in ("ready", "busy")
        assert re.fullmatch(r"\d+ s ago", node.locator(".heartbeat").inner_text())
        assert node.locator("dt:has-text('Tokens/s')").count() == 1
        assert "echo" in node.locator("tr[data-model=echo]").inner_text()
        # the list is swapped in live: a marked node article is replaced, the page kept
        t.page.evaluate("window.__kept = 1")
        t.page.evaluate("document.querySelector('article.node').dataset.old = 'yes'")
        t.page.wait_for_selector(f"article.node[data-node='{web.node_id}']:not([data-old])")
        assert t.page.evaluate("window.__kept") == 1
        first = t.page.get_attribute(".heartbeat", "data-ts")
        t.page.wait_for_function(
            "ts => document.querySelector('.heartbeat').getAttribute('data-ts') !== ts",
            arg=first,
        )
        assert re.fullmatch(r"\d+ s ago", t.page.inner_text(".heartbeat"))
        assert "CPU" in node.locator("dl.hardware").inner_text()
        width = t.page.evaluate("document.documentElement.scrollWidth")
        assert width <= 375, f"the page scrolls sideways: {width} px"
        t.shot("nodes")
        t.assert_clean()


def test_download_progress_errors_and_odd_stats_render() -> None:
    """What a heartbeat reports is the node's word: progress and errors show, a stat of
    the wrong type is left out rather than breaking the page."""
    node = Node(
        "node_x",
        "gpu-box",
        "key_1",
        [{"name": "big"}, {"name": "small"}, {"name": "bad"}],
        4,
        {"cpu": "EPYC", "cpus": 64, "gpus": [{"name": "A100", "memory_bytes": 80 * 2**30}]},
        "0.1.0",
        0.0,
        100.0,
        stats={
            "load": "high",  # not a number: left out
            "tokens_per_second": 812.25,
            "models": [
                {"name": "big", "state": "downloading", "progress": 0.4},
                {"name": "small", "state": "loading", "progress": 0.75},
                {"name": "bad", "state": "error", "error": "<b>out of memory</b>"},
            ],
        },
        labels={"gpu": "a100"},
    )
    html = make_templates().env.get_template("nodes_list.html").render(nodes=[node_view(node)])
    assert '<progress value="0.4" max="1"' in html and "40 %" in html
    assert '<progress value="0.75" max="1"' in html and "75 %" in html
    assert "&lt;b&gt;out of memory&lt;/b&gt;" in html  # escaped
    assert "812.2" in html and "gpu=a100" in html and "A100 (80.0 GiB)" in html
    assert "Load</dt><dd>\u2013" in html  # a dash
