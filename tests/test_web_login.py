"""The web interface's login: a session cookie for an API key, CSRF on what changes
something, logout, and a client key that sees only its own jobs (in a real Chromium)."""

from __future__ import annotations

from typing import Any

import httpx

from tests.browser import Site, tab
from tests.nodes import auth


def test_login_sets_a_strict_httponly_cookie_and_logout_ends_it(chrome: Any, web: Site) -> None:
    with tab(chrome, web.url) as t:
        t.go("/jobs")
        assert t.page.url.startswith(web.url + "/login?next=/jobs")
        t.shot("login")
        t.login(web.key("client"), then="/jobs")
        cookie = next(c for c in t.page.context.cookies() if c["name"] == "obb_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert t.page.evaluate("document.cookie").find("obb_session") == -1
        t.page.click("footer button:has-text('Log out')")
        t.page.wait_for_url(web.url + "/login")
        t.go("/jobs")
        assert "/login" in t.page.url
        # the old cookie no longer works, even replayed by hand
        r = httpx.get(web.url + "/v1/jobs", cookies={"obb_session": cookie["value"]})
        assert r.status_code == 401
        t.assert_clean()


def test_wrong_and_node_keys_are_refused_with_a_message(chrome: Any, web: Site) -> None:
    with tab(chrome, web.url) as t:
        t.go("/login")
        t.page.fill("input[name=api_key]", "obb_client_" + "x" * 43)
        t.page.click("button[type=submit]")
        assert "invalid API key" in t.page.inner_text("[role=alert]")
        t.page.fill("input[name=api_key]", web.key("node"))
        t.page.click("button[type=submit]")
        assert "node key cannot log in" in t.page.inner_text("[role=alert]")
        assert not [c for c in t.page.context.cookies() if c["name"] == "obb_session"]


def _session(web: Site, role: str) -> tuple[httpx.Client, str]:
    """A logged-in HTTP client (as a browser would be) and its CSRF token."""
    client = httpx.Client(base_url=web.url)
    form = client.get("/login")
    token = form.text.split('name="csrf_token" value="')[1].split('"')[0]
    r = client.post("/login", data={"csrf_token": token, "api_key": web.key(role), "next": "/"})
    assert r.status_code == 303 and r.headers["location"] == "/"
    page = client.get("/")
    csrf = page.text.split('name="csrf-token" content="')[1].split('"')[0]
    return client, csrf


def test_the_api_takes_the_cookie_but_changes_need_the_csrf_token(web: Site) -> None:
    client, csrf = _session(web, "client")
    try:
        body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
        refused = client.post("/v1/chat/completions", json=body)
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "csrf_failed"
        done = client.post("/v1/chat/completions", json=body, headers={"X-CSRF-Token": csrf})
        assert done.status_code == 200, done.text
        assert done.json()["choices"][0]["message"]["content"]
        assert client.get("/v1/jobs").status_code == 200
    finally:
        client.close()


def test_a_login_form_without_its_token_is_refused(web: Site) -> None:
    with httpx.Client(base_url=web.url) as client:
        r = client.post("/login", data={"api_key": web.key("client"), "csrf_token": "x"})
        assert r.status_code == 403
        assert "obb_session" not in r.cookies


def test_a_revoked_key_ends_its_sessions(web: Site) -> None:
    admin = auth(web.key("admin"))
    made = httpx.post(
        web.url + "/v1/admin/keys", json={"role": "client", "name": "short"}, headers=admin
    ).json()
    with httpx.Client(base_url=web.url) as client:
        token = client.get("/login").text.split('name="csrf_token" value="')[1].split('"')[0]
        client.post("/login", data={"csrf_token": token, "api_key": made["key"]})
        assert client.get("/v1/jobs").status_code == 200
        httpx.post(web.url + f"/v1/admin/keys/{made['id']}/revoke", headers=admin)
        assert client.get("/v1/jobs").status_code == 401
        assert client.get("/jobs").status_code == 303


def test_next_never_leaves_the_server(web: Site) -> None:
    with httpx.Client(base_url=web.url) as client:
        token = client.get("/login").text.split('name="csrf_token" value="')[1].split('"')[0]
        r = client.post(
            "/login",
            data={"csrf_token": token, "api_key": web.key("client"), "next": "//evil.example/"},
        )
        assert r.headers["location"] == "/"
