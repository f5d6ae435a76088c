"""Hostile input on every page route, in-process, as a logged-in client and admin: odd
ids, query strings and forms get a page with a message (4xx), never a 500; what changes
something without the session's CSRF token is refused and changes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openbeepboop.server.web import batches, chat, jobs, keys, login, nodes, overview, swarm
from tests.conftest import Api, serve_in_process

STREAMS = {"/overview/events", "/nodes/events"}  # endless: checked once, not fuzzed


def _routes() -> list[tuple[str, str]]:
    found = []
    for module in (login, overview, nodes, swarm, jobs, batches, chat, keys):
        for route in module.router.routes:
            for method in sorted(route.methods):  # type: ignore[attr-defined]
                found.append((method, route.path))  # type: ignore[attr-defined]
    return found


async def _login(api: Api, key: str) -> str:
    form = (await api.http.get("/login")).text
    token = form.split('name="csrf_token" value="')[1].split('"')[0]
    r = await api.http.post("/login", data={"csrf_token": token, "api_key": key})
    assert r.status_code == 303
    page = (await api.http.get("/chat")).text
    return page.split('name="csrf-token" content="')[1].split('"')[0]


ODD = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    max_size=40,
)
PARAMS = st.dictionaries(
    st.sampled_from(
        ["status", "model", "key", "batch", "range", "from", "to", "limit", "after", "next"]
    ),
    ODD,
    max_size=4,
)


async def test_page_routes_never_answer_500(tmp_path: Path) -> None:
    async with serve_in_process(tmp_path, rate_limit="") as api:
        csrf = await _login(api, api.admin)
        job = await api.submit("hello")
        routes = [(m, p) for m, p in _routes() if p not in STREAMS and p != "/logout"]

        @settings(
            max_examples=250,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture],
        )
        @given(
            route=st.sampled_from(routes),
            ident=st.one_of(ODD, st.just(job["id"])),
            params=PARAMS,
            form=PARAMS,
        )
        def check(
            route: tuple[str, str], ident: str, params: dict[str, str], form: dict[str, Any]
        ) -> None:
            method, path = route
            ident = quote(ident, safe="")
            url = path.replace("{job_id}", ident).replace("{batch_id}", ident)
            url = url.replace("{key_id}", ident)
            seen.append((method, url, params, form))

        seen: list[tuple[str, str, dict[str, str], dict[str, Any]]] = []
        check()
        for method, url, params, form in seen:
            target = httpx.URL(url)
            if method == "GET":
                r = await api.http.get(target, params=params)
            else:
                r = await api.http.post(target, params=params, data={**form, "csrf_token": csrf})
            assert r.status_code < 500, (method, url, params, form, r.text[:300])
