"""Model affinity, end to end: a real server and a real echo node whose two models take
turns (`exclusive_models`; each switch pays the echo backend's `load_ms`). With affinity
the node serves an alternating queue a model at a time; without, it switches at every
job. And affinity has a bound: a job of the other model is not kept waiting past
`affinity_max_wait_seconds` while the loaded model still has work."""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from openbeepboop.node.config import NodeSection
from tests.conftest import ServerProcess
from tests.nodes import (
    SERVER_LOG_WARNING,
    Proc,
    Procs,
    auth,
    log_events,
    new_server,
    node_id_of,
    start_node,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.filterwarnings(SERVER_LOG_WARNING)
BOUND = 1.0  # affinity_max_wait_seconds of the server with affinity
MODELS = [{"name": name, "backend": "echo", "delay_ms": 40, "load_ms": 100} for name in ("a", "b")]


class Rig:
    """A server and its one node, whose models take turns."""

    def __init__(self, tmp: Path, affinity: float, procs: Procs) -> None:
        self.server: ServerProcess = new_server(
            tmp / "data", OPENBEEPBOOP_AFFINITY_MAX_WAIT_SECONDS=str(affinity)
        )
        config = write_config(tmp / "node.toml", self.server, MODELS, exclusive_models=True)
        self.node: Proc = start_node(procs, config)
        node_id_of(self.node)

    def switches(self) -> int:
        return len(log_events(self.node, "model switched"))

    def submit(self, models: list[str]) -> list[str]:
        jobs = [
            {"body": {"model": m, "messages": [{"role": "user", "content": f"job {i}"}]}}
            for i, m in enumerate(models)
        ]
        r = httpx.post(
            self.server.url + "/v1/jobs",
            json={"jobs": jobs},
            headers=auth(self.server.keys["client_key"]),
            timeout=10,
        )
        assert r.status_code in (200, 201, 202), r.text
        answer: Any = r.json()
        return [str(j["id"]) for j in answer["data"]]

    def times(self, ids: list[str]) -> dict[str, tuple[str, float, float]]:
        """Job id -> (model, created_at, started_at) once every one of `ids` completed,
        read from the server's database."""
        path = self.server.data_dir / "openbeepboop.db"
        marks = ",".join("?" * len(ids))

        def done() -> dict[str, tuple[str, float, float]] | None:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
                found = db.execute(
                    f"SELECT id, model, created_at, started_at, status FROM jobs "
                    f"WHERE id IN ({marks})",
                    ids,
                ).fetchall()
            if len(found) < len(ids) or any(row[4] != "completed" for row in found):
                return None
            return {row[0]: (row[1], row[2], row[3]) for row in found}

        return wait_until(done, 30, "the jobs to complete")

    def close(self) -> None:
        self.server.kill()


@pytest.fixture(scope="module")
def rigs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Rig, Rig]]:
    procs, made = Procs(), []
    try:
        with ThreadPoolExecutor(2) as pool:  # both start at once: half the setup time
            starting = [
                pool.submit(Rig, tmp_path_factory.mktemp(name), affinity, procs)
                for name, affinity in (("on", BOUND), ("off", 0.0))
            ]
        made = [f.result() for f in starting if f.exception() is None]
        for f in starting:
            f.result()  # raises what a failed start raised (the other is closed below)
        yield made[0], made[1]
    finally:
        procs.close()
        for rig in made:
            rig.close()


def test_an_alternating_queue_is_served_a_model_at_a_time_with_affinity(
    rigs: tuple[Rig, Rig],
) -> None:
    counts = {}
    for rig in rigs:
        before = rig.switches()
        ids = rig.submit(["a", "b"] * 10)
        started = sorted(rig.times(ids).values(), key=lambda t: t[2])
        changes = sum(1 for x, y in itertools.pairwise(started) if x[0] != y[0])
        counts[rig] = (rig.switches() - before, changes)
    on, off = rigs
    assert counts[on][0] <= 2 and counts[on][1] == 1, counts[on]  # a ten, then b ten
    assert counts[off][0] >= 15 and counts[off][1] >= 15, counts[off]


def test_affinity_keeps_no_job_of_the_other_model_past_its_bound(rigs: tuple[Rig, Rig]) -> None:
    on, _ = rigs
    many = on.submit(["a"] * 50)  # 50 x 40 ms: the node has work on a for 2 s and more
    (late,) = on.submit(["b"])
    times = on.times([*many, late])
    _, queued, started = times[late]
    waited = started - queued
    after = [s for m, _, s in times.values() if m == "a" and s > started]
    print(f"b waited {waited:.3f} s; {len(after)} jobs of a ran after it")
    assert BOUND - 0.1 <= waited <= BOUND + 1.0, waited  # held by affinity, up to its bound
    assert len(after) >= 5, "b ran only once a's queue was drained"


def test_exclusive_models_do_not_combine_with_on_demand() -> None:
    with pytest.raises(ValidationError, match="exclusive_models does not combine with on_demand"):
        NodeSection(exclusive_models=True, on_demand=["hf:"])
    assert NodeSection(exclusive_models=True).exclusive_models
