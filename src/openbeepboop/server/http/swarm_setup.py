"""Building this server's swarm membership from its settings (only when `dht_port` is
set: the `swarm` extra is imported here, not before)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from openbeepboop.server.core.identity import ServerIdentity, advertised_host, swarm_secret_of
from openbeepboop.server.core.queue import Queue
from openbeepboop.server.core.status import read_status
from openbeepboop.server.settings import ConfigError, ServerSettings

if TYPE_CHECKING:
    from openbeepboop.server.core.swarm import SwarmMember


def swarm_member(
    settings: ServerSettings, identity: ServerIdentity, queue: Queue
) -> SwarmMember | None:
    """The member `settings` ask for, or None (no `dht_port`). ConfigError when the
    extra is missing or the secret cannot be had."""
    if settings.dht_port is None:
        return None
    try:
        from openbeepboop.server.core.swarm import SwarmConfig, SwarmMember
        from openbeepboop.swarm.secret import SwarmSecret
    except ImportError as exc:
        raise ConfigError(
            f"dht_port is set but the swarm needs the `swarm` extra ({exc.name} is missing): "
            "pip install 'openbeepboop[swarm]'"
        ) from None
    dht_host = settings.dht_host or settings.host
    config = SwarmConfig(
        identity=identity,
        secret=SwarmSecret(swarm_secret_of(settings)),
        dht_host=dht_host,
        dht_port=settings.dht_port,
        advertise_host=advertised_host(dht_host).strip("[]"),
        bootstrap=tuple(settings.bootstrap_addresses),
        heartbeat=settings.heartbeat_interval,
    )
    return SwarmMember(config, lambda: read_status(queue, identity))
