"""Helpers for the web interface's browser tests: a real server with an echo node,
Debian's Chromium driven by Playwright, pages that record console errors, logging in,
and 375 px screenshots saved as test artifacts (`test-artifacts/screenshots/`, or
`$OBB_ARTIFACTS/screenshots/`)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ServerProcess
from tests.nodes import Procs, echo_model, new_server, node_id_of, start_node, write_config

CHROMIUM = os.environ.get("OBB_CHROMIUM", "/usr/bin/chromium")
PHONE = {"width": 375, "height": 812}
DESKTOP = {"width": 1280, "height": 900}


def artifacts_dir() -> Path:
    root = Path(os.environ.get("OBB_ARTIFACTS", Path(__file__).parents[1] / "test-artifacts"))
    folder = root / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass
class Site:
    """A real server and one echo node (model `echo`, `delay_ms` per piece)."""

    server: ServerProcess
    procs: Procs
    node_id: str

    @property
    def url(self) -> str:
        return self.server.url

    def key(self, role: str) -> str:
        return self.server.keys[f"{role}_key"]


@contextmanager
def site(data_dir: Path, delay_ms: float = 0, **env: str) -> Iterator[Site]:
    """Start a server and an echo node; stop both after the block."""
    server = new_server(data_dir / "server", **env)
    procs = Procs()
    try:
        config = write_config(data_dir / "node" / "node.toml", server, [echo_model(delay_ms)])
        node_id = node_id_of(start_node(procs, config))
        yield Site(server=server, procs=procs, node_id=node_id)
    finally:
        procs.close()
        server.kill()


def chromium_or_fail() -> str:
    """Debian's Chromium: fail under CI when it is missing, skip elsewhere."""
    if shutil.which(CHROMIUM) is None:
        message = f"{CHROMIUM} is missing: `make browser` installs Debian's chromium"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return CHROMIUM


@contextmanager
def browser() -> Iterator[Any]:
    """A headless Chromium (Playwright's sync API), closed after the block."""
    from playwright.sync_api import sync_playwright

    path = chromium_or_fail()
    with sync_playwright() as pw:
        chrome = pw.chromium.launch(executable_path=path, args=["--no-sandbox"])
        try:
            yield chrome
        finally:
            chrome.close()


@dataclass
class Tab:
    """A page in its own browser context, recording console errors and page errors.

    The pages' CSP forbids eval: give `page.wait_for_function` a function ("() => ..."),
    never a bare expression, which Playwright would evaluate with eval when it polls."""

    page: Any
    base: str
    errors: list[str] = field(default_factory=list)

    def go(self, path: str) -> Any:
        response = self.page.goto(self.base + path)
        return response

    def login(self, key: str, then: str = "/") -> None:
        self.go("/login?next=" + then)
        self.page.fill("input[name=api_key]", key)
        self.page.click("button[type=submit]")
        self.page.wait_for_url(self.base + then)

    def shot(self, name: str) -> Path:
        """A full-page screenshot at 375 px wide (the viewport is restored after)."""
        before = self.page.viewport_size
        self.page.set_viewport_size(PHONE)
        path = artifacts_dir() / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        if before:
            self.page.set_viewport_size(before)
        return path

    def assert_clean(self) -> None:
        assert not self.errors, f"console errors: {self.errors}"


@contextmanager
def tab(
    chrome: Any, base: str, viewport: dict[str, int] | None = None, dark: bool = False
) -> Iterator[Tab]:
    """A fresh context (no cookies) and page on `base`."""
    context = chrome.new_context(
        viewport=viewport or DESKTOP, color_scheme="dark" if dark else "light"
    )
    page = context.new_page()
    page.set_default_timeout(15_000)
    t = Tab(page=page, base=base)
    page.on("console", lambda m: t.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: t.errors.append(str(e)))
    try:
        yield t
    finally:
        context.close()


# -- fixtures (conftest imports them): one Chromium per module, one site for the whole run


@pytest.fixture(scope="module")
def chrome() -> Iterator[Any]:
    """One headless Chromium for the module's tests (not wider: while Playwright's sync API
    runs, its event loop is the thread's, and later modules' asyncio tests could not run)."""
    with browser() as launched:
        yield launched


@pytest.fixture(scope="session")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """One server with an echo node (20 ms a piece: streams arrive in several pieces)
    for every module that takes it: tests on it look only at their own jobs, keys and
    models (a module that needs a server of its own defines its own `web`)."""
    with site(tmp_path_factory.mktemp("web"), delay_ms=20) as started:
        yield started
