"""The web interface's assets and switches, in-process: the vendored libraries are the
files the docs name, the templates hold no inline script (the CSP forbids them), pages
send the security headers, and `web_ui` off / loopback do what docs/web.md says."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import httpx
import pytest

from openbeepboop.server.web.pages import web_dir
from tests.conftest import serve_in_process

VENDOR = {  # file: SHA-256 of what `npm pack` gave (docs/web.md, "What it is made of")
    "htmx.min.js": "d6fdc75f204e6bdefa99b69bf1e6d4ac69b8a364f77929f45c13476b4000f717",
    "sse.min.js": "98a46496de0c3605fbffdce9167ba427bdd9553184f83f149c261891a92c0136",
    "uPlot.iife.min.js": "19c8d4c6ad88929a79f4ae49d6f7161566dfd0ba3d15cc495e974f787eb78f1f",
    "uPlot.min.css": "df630c6a8d6f8eeaff264b50f73ce5b114f646ffd9a0bb74f049b0a00135fa04",
    "marked.umd.js": "bb95d4c15f1289f78486eaacebf3bb18688475ed58a040ef762ed49337090542",
    "purify.min.js": "f69a46022ab1f53e969c8ebbca98172c8995785a9b3be72ea4a12d25b1a1bf67",
    "pico.classless.min.css": "61207a40ffc02a42d1e50143651c121beab70ed413c934c1ff84fa263ba436b0",
}


def test_vendored_libraries_are_the_released_files() -> None:
    folder = web_dir() / "static" / "vendor"
    found = {p.name for p in folder.iterdir()} - {"LICENSES.txt"}
    assert found == set(VENDOR)
    for name, digest in VENDOR.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    licenses = (folder / "LICENSES.txt").read_text()
    for library in ("htmx", "uPlot", "marked", "DOMPurify", "Pico"):
        assert f"==== {library} " in licenses


INLINE_SCRIPT = re.compile(r"<script(?![^>]*\bsrc=)[^>]*>", re.I)
INLINE_HANDLER = re.compile(r"\son[a-z]+\s*=", re.I)
EVAL_HTMX = re.compile(r"\b(hx-on|hx-vars|js:)", re.I)


@pytest.mark.parametrize(
    "template", sorted(p.name for p in (web_dir() / "templates").glob("*.html"))
)
def test_templates_hold_no_inline_script(template: str) -> None:
    text = (web_dir() / "templates" / template).read_text()
    assert not INLINE_SCRIPT.search(text)
    assert not INLINE_HANDLER.search(text)
    assert not EVAL_HTMX.search(text)


async def test_login_page_sends_the_security_headers(tmp_path: Path) -> None:
    async with serve_in_process(tmp_path) as api:
        r = await api.http.get("/login")
        assert r.status_code == 200
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        assert "obb_login_csrf" in r.headers["set-cookie"]
        assert "HttpOnly" in r.headers["set-cookie"]
        assert "SameSite=strict" in r.headers["set-cookie"]
        home = await api.http.get("/")
        assert home.status_code == 303 and home.headers["location"] == "/login?next=/"
        assert (await api.http.get("/static/vendor/htmx.min.js")).status_code == 200
        assert "/login" not in (await api.http.get("/openapi.json")).text


async def test_web_ui_off_serves_no_page(tmp_path: Path) -> None:
    async with serve_in_process(tmp_path, web_ui="off") as api:
        assert (await api.http.get("/")).status_code == 404
        assert (await api.http.get("/login")).status_code == 404
        assert (await api.http.get("/static/app.js")).status_code == 404
        assert (await api.http.get("/v1/models", headers=api.h(api.client))).status_code == 200


async def test_web_ui_loopback_answers_only_this_machine(tmp_path: Path) -> None:
    async with serve_in_process(tmp_path, web_ui="loopback") as api:
        for host, status in (("10.1.2.3", 404), ("127.0.0.1", 200), ("::1", 200)):
            transport = httpx.ASGITransport(app=api.app, client=(host, 5555))
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                assert (await http.get("/login")).status_code == status, host
                r = await http.get("/v1/models", headers=api.h(api.client))
                assert r.status_code == 200  # the API is not affected


async def test_a_login_with_a_bad_form_is_a_page_not_a_crash(tmp_path: Path) -> None:
    async with serve_in_process(tmp_path) as api:
        for data in ({}, {"csrf_token": "x"}, {"api_key": "a" * 10_000}):
            r = await api.http.post("/login", data=data)
            assert r.status_code in (400, 403), r.text
            assert "text/html" in r.headers["content-type"]


async def test_a_page_error_is_a_page_and_an_api_error_stays_json(tmp_path: Path) -> None:
    async with serve_in_process(tmp_path) as api:
        form = (await api.http.get("/login")).text
        token = form.split('name="csrf_token" value="')[1].split('"')[0]
        r = await api.http.post("/login", data={"csrf_token": token, "api_key": api.client})
        assert r.status_code == 303
        for path, status in (("/jobs/job_nope", 404), ("/keys", 403)):
            page = await api.http.get(path)
            assert page.status_code == status, path
            assert "text/html" in page.headers["content-type"], path
            assert 'role="alert"' in page.text
        r = await api.http.get("/v1/jobs/job_nope")
        assert r.status_code == 404 and r.json()["error"]["code"]
