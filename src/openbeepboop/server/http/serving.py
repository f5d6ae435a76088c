"""Running the app under uvicorn with a clean shutdown."""

from __future__ import annotations

import logging
import resource
import signal
from collections.abc import Callable
from types import FrameType

import uvicorn
from fastapi import FastAPI

from openbeepboop.server.http.connections import ConnectionLimits, guarded_protocol
from openbeepboop.server.http.log_redaction import redact_logs
from openbeepboop.server.http.state import app_state
from openbeepboop.server.settings import ServerSettings, StartupRefused


class QueueServer(uvicorn.Server):
    """uvicorn, but shutting down ends long-polls at once (rather than waiting out the
    graceful timeout and cancelling them with a 500), and a graceful stop exits 0 (uvicorn
    would re-raise SIGTERM and die of it).

    With `on_signal`, a signal only calls it: the owner decides when the server stops
    (the all-in-one process drains its embedded node first)."""

    def __init__(
        self, config: uvicorn.Config, app: FastAPI, on_signal: Callable[[], None] | None = None
    ) -> None:
        super().__init__(config)
        self._app = app
        self._on_signal = on_signal

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._on_signal is not None:
            self._on_signal()
            return
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl+C
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        should_exit = await super().on_tick(counter)
        if should_exit:
            app_state(self._app).queue.close()
        return should_exit


class StartupRefusal(logging.Filter):
    """uvicorn logs the traceback of a lifespan that failed; when it failed on purpose
    (`StartupRefused`: a user's mistake, such as a key given under the wrong role),
    the log shows its one-line message instead."""

    MARK = StartupRefused.__name__ + ": "

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("Traceback"):
            last = record.msg.rstrip().rpartition("\n")[2]
            if self.MARK in last:
                record.msg = "refusing to start: %s"
                record.args = (last.partition(self.MARK)[2],)
        return True


log = logging.getLogger("openbeepboop.server")
# the soft limit raised to at most this when the hard limit is unlimited
OPEN_FILES_WANTED = 1 << 20


def raise_open_file_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit (each connection
    holds one; the default soft limit of 1,024 is soon reached). The limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES_WANTED if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open files limit from %d: %s", soft, exc)
            return soft
        return wanted
    return soft


def make_server(
    app: FastAPI,
    settings: ServerSettings,
    access_log: bool = False,
    on_signal: Callable[[], None] | None = None,
) -> QueueServer:
    raise_open_file_limit()
    config = uvicorn.Config(
        app,
        http=guarded_protocol(ConnectionLimits.of(settings)),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=access_log,
        timeout_graceful_shutdown=10,
        server_header=False,  # `server: uvicorn` tells a client nothing it needs
    )
    redact_logs()  # uvicorn has set up its log handlers by now
    lifespan_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, StartupRefusal) for f in lifespan_log.filters):
        lifespan_log.addFilter(StartupRefusal())
    return QueueServer(config, app, on_signal)
