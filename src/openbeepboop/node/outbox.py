"""The node's result outbox: a result is written here before it is sent, and deleted only
once the server has answered for it, so it survives a server outage and a node restart
(a crash or kill of the node process included).

Writes are not fsynced (WAL, `synchronous=NORMAL`): what a power cut could take from
here is a result the server has not acknowledged, so it still holds the job under a
lease, and when that lease expires the job runs again. An fsync per result (0.7-1 ms on
these disks) would sit on the path of every synchronous call for that case only."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from openbeepboop.node.backends.base import JSON
from openbeepboop.private_paths import private_sqlite


@dataclass(frozen=True, slots=True)
class Pending:
    """A result waiting for the server's acknowledgement."""

    job_id: str
    lease_id: str
    payload: JSON  # {"result": ...} or {"error": ...}


class Outbox:
    """A small SQLite file; calls are quick and made from the event loop."""

    def __init__(self, path: Path) -> None:
        private_sqlite(path)  # results of other people's prompts
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox (job_id TEXT PRIMARY KEY, lease_id TEXT NOT NULL, "
            "payload TEXT NOT NULL, created_at REAL NOT NULL)"
        )

    def put(self, item: Pending) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO outbox VALUES (?, ?, ?, ?)",
            (item.job_id, item.lease_id, orjson.dumps(item.payload).decode(), time.time()),
        )

    def take(self, limit: int) -> list[Pending]:
        rows = self._db.execute(
            "SELECT job_id, lease_id, payload FROM outbox ORDER BY created_at LIMIT ?", (limit,)
        )
        return [Pending(j, lease, orjson.loads(p)) for j, lease, p in rows]

    def lease_ids(self, limit: int) -> list[str]:
        """The leases of the oldest `limit` results waiting here."""
        rows = self._db.execute("SELECT lease_id FROM outbox ORDER BY created_at LIMIT ?", (limit,))
        return [lease for (lease,) in rows]

    def remove(self, job_ids: list[str]) -> None:
        """Forget acknowledged results, in one transaction. A delete lost in a crash only
        sends that result again, which the server refuses."""
        try:
            self._db.execute("BEGIN")
            self._db.executemany("DELETE FROM outbox WHERE job_id = ?", [(j,) for j in job_ids])
            self._db.execute("COMMIT")
        finally:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")

    def __len__(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM outbox").fetchone()[0])

    def close(self) -> None:
        self._db.close()
