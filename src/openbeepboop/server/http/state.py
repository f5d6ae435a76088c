"""`AppState`: what the routes of one app work with, built once by `create_app` and
found with `app_state(request)` (the app keeps it as its attribute `obb`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import HTTPConnection

from openbeepboop.server.core.assistants import Assistants
from openbeepboop.server.core.auth import KeyRing
from openbeepboop.server.core.batches import Batches
from openbeepboop.server.core.dashboard import Dashboard
from openbeepboop.server.core.files import Files
from openbeepboop.server.core.identity import ServerIdentity
from openbeepboop.server.core.queue import Queue
from openbeepboop.server.core.sessions import Sessions
from openbeepboop.server.core.swarm_keys import SwarmKeys
from openbeepboop.server.http.metrics import Metrics
from openbeepboop.server.http.ratelimit import KeyRateLimiter
from openbeepboop.server.settings import ServerSettings

if TYPE_CHECKING:  # the swarm needs the `swarm` extra: imported only when configured
    from openbeepboop.server.core.swarm import SwarmMember


@dataclass(frozen=True, slots=True)
class AppState:
    """The server's services and settings, for its routes."""

    settings: ServerSettings
    queue: Queue
    files: Files
    batches: Batches
    assistants: Assistants
    keyring: KeyRing
    rate_limiter: KeyRateLimiter
    metrics: Metrics
    sessions: Sessions
    dashboard: Dashboard  # the web pages' shared live sampler (started by a viewer)
    identity: ServerIdentity  # this server's id, name and URL (/status, /info, the swarm)
    swarm: SwarmMember | None = None  # this server's swarm membership, when it has one
    swarm_keys: SwarmKeys | None = None  # the swarm's revocations (None: in no swarm)


def app_state(conn: HTTPConnection | Starlette) -> AppState:
    """The state of the app serving `conn` (a request or a WebSocket), or of an app."""
    app: Any = conn if isinstance(conn, Starlette) else conn.app
    state: AppState = app.obb
    return state
