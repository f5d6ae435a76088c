"""The Keys page in a real Chromium: an admin creates a key whose secret is shown once
and works, revokes it after a confirmation step (and is warned before revoking the key
of their own session); a client key is refused the page; forms need the CSRF token."""

from __future__ import annotations

import re
from typing import Any

import httpx
from playwright.sync_api import expect

from tests.browser import Site, Tab, tab
from tests.nodes import auth


def _api_status(web: Site, secret: str) -> int:
    return httpx.get(web.url + "/v1/jobs", headers=auth(secret), timeout=10).status_code


def _new_key(web: Site, role: str, name: str) -> dict[str, Any]:
    r = httpx.post(
        web.url + "/v1/admin/keys",
        json={"role": role, "name": name},
        headers=auth(web.key("admin")),
        timeout=10,
    )
    assert r.status_code == 201, r.text
    return dict(r.json())


def _row(t: Tab, key_id: str) -> Any:
    return t.page.locator(f"tr#key-{key_id}")


def test_a_new_key_is_shown_once_works_and_stops_working_once_revoked(
    chrome: Any, web: Site
) -> None:
    with tab(chrome, web.url) as t:
        t.login(web.key("admin"), then="/keys")
        t.page.select_option("select[name=role]", "client")
        t.page.fill("input[name=name]", "ci-bot")
        t.page.click("button:has-text('Create key')")
        secret = t.page.input_value("#new-key-secret")
        assert secret.startswith("obb_client_")
        t.page.click("#copy-key")
        # the clipboard answers with a promise: the status is set a moment after the click
        expect(t.page.locator("#copy-status")).to_have_text(
            re.compile(r"^(Copied\.|Selected: press Ctrl\+C \(⌘C\) to copy\.)$")
        )
        assert t.page.url == web.url + "/keys"  # a reload asks for the page, not the form
        assert _api_status(web, secret) == 200
        key_id = t.page.inner_text("#new-key code")
        assert "ci-bot" in _row(t, key_id).inner_text()
        t.shot("keys")
        t.page.reload()
        assert secret not in t.page.content()
        assert t.page.locator("#new-key").count() == 0
        # revoking takes a confirmation
        _row(t, key_id).locator("a.revoke").click()
        confirm = t.page.locator("#confirm-revoke")
        assert "ci-bot" in confirm.inner_text()
        assert "the key you are logged in with" not in confirm.inner_text()
        assert _api_status(web, secret) == 200
        confirm.locator("button[type=submit]").click()
        t.page.wait_for_url(web.url + "/keys")
        assert "is revoked" in t.page.inner_text("main")
        assert "revoked" in _row(t, key_id).locator("td.state").inner_text()
        assert _row(t, key_id).locator("a.revoke").count() == 0
        assert _api_status(web, secret) == 401
        t.assert_clean()


def test_revoking_ones_own_key_warns_and_logs_out(chrome: Any, web: Site) -> None:
    mine = _new_key(web, "admin", "on-call")
    with tab(chrome, web.url) as t:
        t.login(mine["key"], then="/keys")
        assert "(you)" in _row(t, mine["id"]).inner_text()
        _row(t, mine["id"]).locator("a.revoke").click()
        confirm = t.page.locator("#confirm-revoke")
        assert "the key you are logged in with" in confirm.inner_text()
        button = confirm.locator("button[type=submit]")
        assert button.inner_text() == "Revoke my own key and log out"
        # a plain confirmation (a crafted form) is not enough for one's own key
        t.page.evaluate("() => { document.querySelector('input[name=confirm]').value = 'yes'; }")
        button.click()
        t.page.wait_for_selector("#confirm-revoke")
        assert _api_status(web, mine["key"]) == 200
        t.page.locator("#confirm-revoke button[type=submit]").click()
        t.page.wait_for_url(web.url + "/login")
        assert _api_status(web, mine["key"]) == 401
        assert not [c for c in t.page.context.cookies() if c["name"] == "obb_session"]
        t.assert_clean()


def test_a_client_key_gets_403_and_no_keys_link(chrome: Any, web: Site) -> None:
    with tab(chrome, web.url) as t:
        t.login(web.key("client"), then="/chat")
        assert t.page.locator("nav a[href='/keys']").count() == 0
        response = t.go("/keys")
        assert response.status == 403
        assert "admin" in t.page.inner_text("[role=alert]")


def _admin_session(web: Site) -> tuple[httpx.Client, str]:
    """A logged-in HTTP client (as a browser would be) and its CSRF token."""
    client = httpx.Client(base_url=web.url)
    token = client.get("/login").text.split('name="csrf_token" value="')[1].split('"')[0]
    client.post("/login", data={"csrf_token": token, "api_key": web.key("admin")})
    page = client.get("/keys")
    assert page.status_code == 200
    return client, page.text.split('name="csrf-token" content="')[1].split('"')[0]


def test_forms_need_the_token_and_bad_input_gets_a_message(web: Site) -> None:
    client, csrf = _admin_session(web)
    try:
        before = client.get("/keys").text.count("<tr id=")
        r = client.post("/keys", data={"role": "client", "name": "x"})
        assert r.status_code == 403
        r = client.post("/keys", data={"role": "root", "name": "x", "csrf_token": csrf})
        assert r.status_code == 400 and "Pick a role" in r.text
        r = client.post("/keys", data={"role": "client", "name": "n" * 300, "csrf_token": csrf})
        assert r.status_code == 400 and "at most 256" in r.text
        assert client.get("/keys").text.count("<tr id=") == before
        victim = _new_key(web, "client", "victim")
        r = client.post(f"/keys/{victim['id']}/revoke", data={"confirm": "yes"})
        assert r.status_code == 403
        r = client.post(f"/keys/{victim['id']}/revoke", data={"csrf_token": csrf})
        assert r.status_code == 200 and "confirm-revoke" in r.text  # asks to confirm
        assert _api_status(web, victim["key"]) == 200
        r = client.post("/keys/key_nope/revoke", data={"csrf_token": csrf, "confirm": "yes"})
        assert r.status_code in (400, 404)
        assert client.get("/keys?revoke=key_nope").status_code == 200
    finally:
        client.close()
