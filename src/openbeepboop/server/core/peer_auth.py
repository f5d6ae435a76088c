"""Member-to-member authentication: a request between swarm members carries
`X-OpenBeepBoop-Swarm: <unix seconds>.<hex HMAC>`, the HMAC ("peers" purpose of the swarm
secret) over `METHOD|route|seconds`. Never an API key: no member hands another its keys.

The route is the server's own route (`/swarm/revocations`), not the URL's path, so a
member behind a proxy that adds a path prefix still checks. A header more than
`MAX_SKEW` seconds from the receiver's clock is refused (a replay is only ever a read).

>>> from openbeepboop.swarm.secret import SwarmSecret
>>> s = SwarmSecret("a swarm secret of 16+ chars")
>>> header = peer_header(s, "GET", "/swarm/revocations", 100.0)
>>> check_peer(s, "GET", "/swarm/revocations", header, 150.0)
"""

from __future__ import annotations

import math

from openbeepboop.server.errors import AuthenticationFailed
from openbeepboop.swarm.secret import SwarmSecret

HEADER = "X-OpenBeepBoop-Swarm"
PURPOSE = "peers"
MAX_SKEW = 120.0


def _signed(method: str, route: str, seconds: int) -> bytes:
    return f"{method.upper()}|{route}|{seconds}".encode()


def peer_header(secret: SwarmSecret, method: str, route: str, now: float) -> str:
    """The header value a member sends with a request for `route`."""
    seconds = math.floor(now)
    return f"{seconds}.{secret.mac(PURPOSE, _signed(method, route, seconds)).hex()}"


def check_peer(secret: SwarmSecret, method: str, route: str, value: str | None, now: float) -> None:
    """Nothing when `value` is a fresh header of a member of this swarm for `route`;
    AuthenticationFailed (HTTP 401) when it is missing, wrong or stale."""
    if not value:
        raise AuthenticationFailed(
            f"missing member authentication: this route is for swarm members ('{HEADER}')",
            code="missing_swarm_auth",
        )
    seconds_text, _, mac_hex = value.strip().partition(".")
    try:
        seconds, mac = int(seconds_text), bytes.fromhex(mac_hex)
    except ValueError:
        seconds, mac = 0, b""
    if len(seconds_text) > 12 or not secret.verify(PURPOSE, _signed(method, route, seconds), mac):
        raise AuthenticationFailed(
            f"invalid member authentication in '{HEADER}' (another swarm's secret?)",
            code="invalid_swarm_auth",
        )
    if abs(now - seconds) > MAX_SKEW:
        raise AuthenticationFailed(
            f"stale member authentication in '{HEADER}': its time is more than "
            f"{MAX_SKEW:.0f} s from this server's clock",
            code="stale_swarm_auth",
        )
