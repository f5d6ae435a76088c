"""The node's engine: load the models, register, then fetch jobs for free slots, run
them, keep their leases alive and upload their results, until stopped (daemon) or until
nothing is left (batch). Each of those is a collaborator of its own; `NodeRunner` wires
them, runs each job's task and owns the lifecycle:

- `Session`: the node_id, registration, the protocol's calls (session.py)
- `Fetcher`: one long-poll loop per model for its free slots (fetcher.py)
- `ModelSwitch`: with `exclusive_models`, one model loaded at a time (switch.py)
- `Executor`: runs a job on its model's backend (executor.py)
- `DeltaPusher`: the text of streamed jobs, batched (deltas.py)
- `Heartbeat`: leases renewed, cancelled and lost jobs stopped (heartbeat.py)
- `CancelWatch`: a long-poll that hears of a cancelled running job at once (cancel_watch.py)
- `Uploader`: results through the outbox to the server (uploader.py)

Stopping (SIGTERM/SIGINT): fetching stops, running jobs get `drain_seconds` to finish,
the rest are released back to the queue; a second signal releases at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from openbeepboop.node.backends.base import JSON, Backend, ModelConfig
from openbeepboop.node.cancel_watch import CancelWatch
from openbeepboop.node.client import NodeClient, ServerClient, ServerRefused, ServerUnreachable
from openbeepboop.node.config import NodeConfig, read_model_entry
from openbeepboop.node.deltas import DeltaPusher
from openbeepboop.node.executor import BackendExecutor, BackendFactory
from openbeepboop.node.fetcher import Fetcher, Slot
from openbeepboop.node.heartbeat import Heartbeat
from openbeepboop.node.jobs import RELEASED, LeasedJob, MalformedJob, Outcome, Running
from openbeepboop.node.models import ModelCache
from openbeepboop.node.on_demand import OnDemand
from openbeepboop.node.outbox import Outbox
from openbeepboop.node.results import completion_tokens
from openbeepboop.node.session import Session
from openbeepboop.node.switch import ModelSwitch
from openbeepboop.node.uploader import Uploader
from openbeepboop.node.worker import WorkerBackend, build_isolated

log = logging.getLogger("openbeepboop.node")
FINAL_FLUSH_SECONDS = 30.0  # after the drain: how long results wait for the server


@dataclass
class Totals:
    """What the node has done, for its stats."""

    completed: int = 0
    failed: int = 0
    tokens: int = 0
    recent: list[tuple[float, int, float]] = field(default_factory=list)  # (at, tokens, secs)

    def tokens_per_second(self) -> float:
        """Over the jobs that ended in the last minute."""
        now = time.monotonic()
        self.recent = [r for r in self.recent if now - r[0] < 60]
        secs = sum(r[2] for r in self.recent)
        return round(sum(r[1] for r in self.recent) / secs, 2) if secs else 0.0


class NodeRunner:
    """Runs one node until stopped (daemon) or until the queue is drained (batch).

    `client` and `backends` (a factory: model config, models_dir -> Backend) replace the
    HTTP client and the installed backends (by default, run in worker processes where
    the model wants one: worker.py), e.g. in tests."""

    def __init__(
        self,
        config: NodeConfig,
        client: ServerClient | None = None,
        *,
        backends: BackendFactory = build_isolated,
    ) -> None:
        self.config = config
        self.client: ServerClient = client or NodeClient(
            config.server.url,
            config.server.api_key,
            config.server.timeout_seconds,
            config.node.labels,
        )
        self.outbox = Outbox(config.state_dir() / f"outbox-{_outbox_name(config)}.db")
        self.running = Running()
        self.totals = Totals()
        self._stopping = asyncio.Event()
        self._release_now = asyncio.Event()
        self.capacity = sum(m.concurrency for m in config.models)
        llama = any(m.backend == "llama_cpp" for m in config.models)
        self.session = Session(
            self.client, config.node.name, self._model_states, self.capacity, self._stopping, llama
        )
        self.deltas = DeltaPusher(self.session)
        models_dir = config.models_dir()
        # models that take turns share one `changed` event: their single fetch loop
        # waits for any job to end (switch.py)
        changed = asyncio.Event() if config.node.exclusive_models else None
        self.slots = {
            m.name: _slot(BackendExecutor(m, backends, models_dir, self.deltas), changed)
            for m in config.models
        }
        self.switch = None if changed is None else ModelSwitch(changed)
        self.uploader = Uploader(self.session, self.outbox, self._release_now)
        self.heartbeat = Heartbeat(
            self.session,
            self.running,
            self.stats,
            config.node.heartbeat_seconds,
            pending=self.outbox.lease_ids,
            back=self.uploader.server_back,
        )
        self.cancel_watch = CancelWatch(self.session, self.running)
        self.fetcher = Fetcher(
            self.session,
            list(self.slots.values()),
            self._start,
            self._reject,
            config.node.poll_seconds,
            self._stopping,
            self.switch,
        )
        self.on_demand = OnDemand(
            self.session,
            config.node.on_demand,
            lambda model: model in self.slots,
            self._add_model,
            self._stopping,
        )

    @property
    def node_id(self) -> str:
        """The id the server gave this node when it registered ("" before)."""
        return self.session.node_id

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self, batch: bool = False, install_signals: bool = True) -> int:
        """Serve until stopped; in `batch` mode until nothing is left. Returns an exit code.
        Without `install_signals` the owner calls `stop()` (the all-in-one server does)."""
        if install_signals:
            self._install_signals()
        try:
            code = await self._join(batch)
            if code == 0:
                await self._serve(batch)
        finally:
            pending = len(self.outbox)  # before _close() closes it
            await self._close()
        if code == 0 and pending:
            log.warning(
                "results not yet acknowledged; sent on next start", extra={"count": pending}
            )
        return code

    def stop(self) -> None:
        """First call: stop fetching and drain. Second call: release running jobs now."""
        if self._stopping.is_set():
            self._release_now.set()
            return
        log.info("stopping: draining running jobs", extra={"running": len(self.running)})
        self._stopping.set()
        self.fetcher.stop()

    async def _join(self, batch: bool) -> int:
        """Load the models and register: 0, or the exit code of a node that cannot serve."""
        for slot in self.slots.values():
            await slot.executor.load()
        if self.switch is not None:
            await self.switch.start(list(self.slots.values()))
        if not any(slot.executor.state in ("ready", "unloaded") for slot in self.slots.values()):
            log.error("no model could be loaded; stopping")
            return 1
        try:
            await self.session.register(give_up=batch)
        except ServerUnreachable as exc:
            log.error("server unreachable", extra={"url": self.config.server.url, "why": str(exc)})
            return 2
        except ServerRefused as exc:
            log.error("server refused the node", extra={"status": exc.status, "why": exc.message})
            return 2
        return 0

    async def _serve(self, batch: bool) -> None:
        loops = [
            self.heartbeat.run(),
            self.uploader.run(),
            self.deltas.run(),
            self.cancel_watch.run(),
        ]
        if self.config.node.on_demand and not batch:
            loops.append(self.on_demand.run())
        background = [asyncio.create_task(loop) for loop in loops]
        try:
            await self.fetcher.run(batch)
            await self._drain()
            await self.uploader.flush(deadline=time.monotonic() + FINAL_FLUSH_SECONDS)
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)

    async def _drain(self) -> None:
        """Give running jobs `drain_seconds` (until a second stop), then release them."""
        deadline = time.monotonic() + self.config.node.drain_seconds
        while self.running and not self._release_now.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._release_now.wait(), min(remaining, 0.2))
        self.running.stop_all("released")
        await asyncio.gather(*self.running.tasks(), return_exceptions=True)

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)

    async def _close(self) -> None:
        for slot in self.slots.values():
            await slot.executor.close()
        await self.client.close()
        self.outbox.close()

    async def _add_model(self, spec: str) -> bool:
        """Serve `spec` (a model named by an on-demand source) from now on: a lazy
        worker, which its first job starts (pull, load, run). False when the model cache
        has no room left for on-demand models."""
        models_dir = self.config.models_dir()
        used = sum(m.size for m in ModelCache(models_dir).entries())
        if used >= self.config.node.on_demand_max_gb * 2**30:
            return False
        entry = read_model_entry(
            {
                "name": spec,
                "backend": "llama_cpp",
                "path": spec,
                "worker": True,
                "idle_unload_seconds": self.config.node.on_demand_idle_unload_seconds,
            }
        )
        executor = BackendExecutor(entry, _lazy_worker, models_dir, self.deltas)
        await executor.load()
        slot = Slot(executor)
        self.slots[spec] = slot
        self.capacity += entry.concurrency
        self.fetcher.add(slot)
        return True

    # -- jobs --------------------------------------------------------------------------

    def _start(self, job: LeasedJob) -> None:
        self.heartbeat.learn(job)
        slot = self.slots.get(job.model)
        if slot is None or slot.executor.state == "error":  # not asked for, or cannot load
            message = f"model {job.model} not served here"
            self.uploader.put(
                job.id, job.lease_id, Outcome.failed(message, "model_not_served", True)
            )
            return
        slot.running += 1
        self.running.add(job, asyncio.create_task(self._run_job(slot, job)))
        self.cancel_watch.started()
        log.info("job started", extra=self._fields(job))

    def _reject(self, bad: MalformedJob) -> None:
        log.error("malformed job", extra={"job": bad.job_id, "why": str(bad)})
        if bad.job_id is not None and bad.lease_id is not None:
            message = f"the node could not read the job: {bad}"
            self.uploader.put(
                bad.job_id, bad.lease_id, Outcome.failed(message, "malformed_job", False)
            )

    async def _run_job(self, slot: Slot, job: LeasedJob) -> None:
        started = time.monotonic()
        try:
            if self.switch is None:
                outcome = await slot.executor.run(job)
            else:
                async with self.switch.turn(slot):
                    outcome = await self._run_loaded(slot, job)
        except asyncio.CancelledError:
            reason = self.running.stop_reason(job.id) or "released"
            log.info(f"job {reason}", extra=self._fields(job))
            if reason == "released":
                self.uploader.put(job.id, job.lease_id, RELEASED)
            return
        finally:
            slot.running -= 1
            self.running.remove(job.id)
            slot.changed.set()
        self._count(job, outcome, time.monotonic() - started)
        self.uploader.put(job.id, job.lease_id, outcome)

    @staticmethod
    async def _run_loaded(slot: Slot, job: LeasedJob) -> Outcome:
        """Run `job` on its model, just switched to: unless it failed to load."""
        if slot.executor.state == "error":
            message = f"model {job.model} failed to load: {slot.executor.error}"
            return Outcome.failed(message, "model_not_served", True)
        return await slot.executor.run(job)

    def _count(self, job: LeasedJob, outcome: Outcome, elapsed: float) -> None:
        error = outcome.error
        if error is None:
            tokens = completion_tokens(outcome.payload["result"])
            self.totals.completed += 1
            self.totals.tokens += tokens
            self.totals.recent.append((time.monotonic(), tokens, elapsed))
            extra = {"tokens": tokens, "seconds": round(elapsed, 3)}
            log.info("job completed", extra={**self._fields(job), **extra})
        else:
            self.totals.failed += 1
            extra = {"code": error["code"], "retryable": error["retryable"]}
            log.info("job failed", extra={**self._fields(job), **extra})

    def _fields(self, job: LeasedJob) -> JSON:
        fields: JSON = {"job": job.id, "model": job.model, "attempt": job.attempt}
        if self.config.node.log_prompts:
            fields["request"] = job.request
        return fields

    # -- stats -------------------------------------------------------------------------

    def stats(self) -> JSON:
        """What heartbeats report: load, counts, speed and the models' states."""
        return {
            "load": round(len(self.running) / (self.capacity or 1), 3),
            "running": len(self.running),
            "tokens_per_second": self.totals.tokens_per_second(),
            "completed": self.totals.completed,
            "failed": self.totals.failed,
            "tokens": self.totals.tokens,
            "outbox": len(self.outbox),
            "models": self._model_states(),
            **({"on_demand": self.config.node.on_demand} if self.config.node.on_demand else {}),
            **({"switches": self.switch.switches} if self.switch is not None else {}),
        }

    def _model_states(self) -> list[JSON]:
        return [_model_state(slot) for slot in self.slots.values()]


def _model_state(slot: Slot) -> JSON:
    executor = slot.executor
    config = executor.config
    state = executor.state
    return {
        "name": config.name,
        "state": "busy" if state == "ready" and slot.running else state,
        "progress": executor.progress,
        "backend": config.backend,
        "concurrency": config.concurrency,
        **({"error": executor.error} if executor.error else {}),
    }


def _slot(executor: BackendExecutor, changed: asyncio.Event | None) -> Slot:
    return Slot(executor) if changed is None else Slot(executor, changed=changed)


def _lazy_worker(config: ModelConfig, models_dir: Path) -> Backend:
    return WorkerBackend(config, models_dir, lazy=True)


def _outbox_name(config: NodeConfig) -> str:
    # the default name ends in the pid, but the outbox must outlive the process
    named = "name" in config.node.model_fields_set
    name = config.node.name if named else socket.gethostname()
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80] or "node"
