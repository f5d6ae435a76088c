"""Who this server is: its id, name and public URL (the swarm's records, /status, /info)
and the swarm secret it signs with. Made once and kept in the data directory."""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from openbeepboop import __version__
from openbeepboop.private_paths import private_dir, write_private
from openbeepboop.server.settings import ConfigError, ServerSettings

ID_FILE = "server-id"
SECRET_FILE = "swarm-secret"
WILDCARDS = ("", "0.0.0.0", "::", "[::]")


@dataclass(frozen=True, slots=True)
class ServerIdentity:
    """This server as others see it."""

    id: str
    name: str
    url: str
    version: str
    started_at: float


def identity_of(settings: ServerSettings, now: float | None = None) -> ServerIdentity:
    """The identity `settings` give, making and keeping an id on the first start."""
    return ServerIdentity(
        id=settings.server_id or _kept(settings.data_dir / ID_FILE, _new_id),
        name=settings.server_name or socket.gethostname()[:64],
        url=settings.public_url or f"http://{advertised_host(settings.host)}:{settings.port}",
        version=__version__,
        started_at=time.time() if now is None else now,
    )


def swarm_secret_of(settings: ServerSettings) -> str:
    """The configured swarm secret; else the one kept in DIR/swarm-secret (made on the
    first start of a server that joins no one). Joining others without their secret is a
    ConfigError: their records and keys could never be trusted here."""
    if settings.swarm_secret:
        return settings.swarm_secret
    path = settings.data_dir / SECRET_FILE
    if not path.exists() and settings.bootstrap:
        raise ConfigError(
            "joining a swarm (bootstrap is set) needs the swarm's secret: set swarm_secret "
            "in server.toml or OPENBEEPBOOP_SWARM_SECRET to the value the other members use "
            f"(on the first member: `cat {SECRET_FILE}` in its data directory)"
        )
    return _kept(path, lambda: secrets.token_urlsafe(32))


def advertised_host(host: str) -> str:
    """`host`, or when it is a wildcard the address this machine reaches others from."""
    if host not in WILDCARDS:
        return f"[{host}]" if ":" in host else host
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # TEST-NET: nothing is sent, the route is chosen
        return str(probe.getsockname()[0])
    except OSError:
        return "127.0.0.1"
    finally:
        probe.close()


def _new_id() -> str:
    return "srv_" + secrets.token_hex(6)


def _kept(path: Path, make: Callable[[], str]) -> str:
    if path.exists():
        value = path.read_text().strip()
        if value:
            return value
    value = make()
    private_dir(path.parent, tighten=False)
    write_private(path, value + "\n")
    return value
