"""What the environment says about outgoing HTTP, read once for an aiohttp session: the
proxy (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, `NO_PROXY`) and the certificates
(`SSL_CERT_FILE`, `SSL_CERT_DIR`), obeyed as httpx obeys them. aiohttp's own
`trust_env` would read them (and ~/.netrc) again in a thread for every request."""

from __future__ import annotations

import base64
import os
import ssl
import urllib.request
from typing import Any

import certifi
from yarl import URL


def env_proxy(api_base: str) -> tuple[URL | None, str | None]:
    """The proxy the environment names for `api_base` (`HTTPS_PROXY`, `HTTP_PROXY`,
    `ALL_PROXY`, `NO_PROXY`, obeyed as httpx obeyed them), without its credentials, and
    the `Proxy-Authorization` they make. Read once: aiohttp's `trust_env` would read them
    (and ~/.netrc) in a thread for every request."""
    url = URL(api_base)
    proxies = urllib.request.getproxies()
    found = proxies.get(url.scheme) or proxies.get("all")
    if not found or urllib.request.proxy_bypass(url.host or ""):
        return None, None
    proxy = URL(found)
    if proxy.scheme not in ("http", "https"):  # socks: neither httpx nor aiohttp alone
        return None, None
    if proxy.user is None:
        return proxy, None
    credentials = f"{proxy.user}:{proxy.password or ''}".encode()
    return proxy.with_user(None), "Basic " + base64.b64encode(credentials).decode()


def tls_context() -> ssl.SSLContext:
    """Certificates where httpx found them: `SSL_CERT_FILE`, `SSL_CERT_DIR`, else certifi's
    (aiohttp's default is the system's store)."""
    if os.environ.get("SSL_CERT_FILE"):
        return ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    if os.environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context(capath=os.environ["SSL_CERT_DIR"])
    return ssl.create_default_context(cafile=certifi.where())


def proxy_arguments(url: str) -> tuple[dict[str, Any], dict[str, str]]:
    """For requests to `url`: the keyword arguments that route them through the
    environment's proxy, and the headers to add to every request (the proxy's
    credentials, for plain HTTP, where the request itself goes to the proxy)."""
    proxy, auth = env_proxy(url)
    arguments: dict[str, Any] = {"proxy": proxy} if proxy else {}
    if auth and URL(url).scheme == "https":  # for the proxy's CONNECT
        arguments["proxy_headers"] = {"Proxy-Authorization": auth}
        return arguments, {}
    return arguments, {"Proxy-Authorization": auth} if auth else {}
