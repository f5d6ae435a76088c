"""DSPy through the server, both routes of docs/recipes.md, against a real server whose node
serves the bundled Gemma 3 270M (llama-cpp-python) and an echo model:

- `dspy.LM("openai/gemma-3-270m", api_base=.../v1, api_key=...)` (plain HTTP) and
  `jobs_lm("gemma-3-270m", ...)` (every call a job) each run a `dspy.Predict` program
  with `TolerantChatAdapter`: a string answer comes back, from a job of the right model
  on the server (the model is tiny: its wisdom is not checked);
- the jobs LM survives a restart: a new LM (as after a crash) re-running the same program
  creates no job, and answers the same; another run name makes new jobs;
- the jobs LM on echo: async calls from two event loops, calls from many threads at
  once, rollouts and `n` > 1 (jobs of their own), the job knobs (priority, metadata with
  the run's name, the server's response cache), a job that an earlier run left cancelled
  is submitted again (once), and a saved LM holds no key and loads.

DSPy's deprecation warnings are errors here (pyproject's `filterwarnings`): the jobs LM
uses DSPy 3.4's engine interface, not the deprecated `BaseLM.forward`.

One server and one node process serve the module; Gemma is asked for few, short answers.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import dspy
import httpx
import pytest

from openbeepboop.integrations.dspy import (
    JobOptions,
    TolerantChatAdapter,
    chat_body,
    idempotency_key,
    jobs_lm,
)
from tests.conftest import ServerProcess
from tests.nodes import (
    SERVER_LOG_WARNING,
    Procs,
    echo_model,
    new_server,
    start_node,
    wait_until,
    write_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings(SERVER_LOG_WARNING)]


GEMMA = "gemma-3-270m"
QUESTIONS = ["What is the capital of France?", "What colour is the sky?"]


@dataclass
class Rig:
    server: ServerProcess
    http: httpx.Client

    @property
    def key(self) -> str:
        return str(self.server.keys["client_key"])

    def jobs(self, model: str) -> list[dict[str, Any]]:
        r = self.http.get("/v1/jobs", params={"model": model, "limit": 100})
        assert r.status_code == 200, r.text
        return list(r.json()["data"])


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("dspy")
    procs = Procs()
    server = new_server(tmp / "server")
    http = httpx.Client(
        base_url=server.url,
        headers={"Authorization": f"Bearer {server.keys['client_key']}"},
        timeout=30,
    )
    try:
        models = [
            {"name": GEMMA, "backend": "llama_cpp", "n_ctx": 1024},
            echo_model(),
            echo_model(name="echo-slow", delay_ms=1500),
        ]
        start_node(procs, write_config(tmp / "node" / "node.toml", server, models))

        def served() -> bool:
            names = {m["id"] for m in http.get("/v1/models").json()["data"]}
            return {GEMMA, "echo", "echo-slow"} <= names

        wait_until(served, 120, "the Gemma node")
        yield Rig(server, http)
    finally:
        procs.close()
        http.close()
        server.kill(signal.SIGTERM)


@pytest.fixture(autouse=True)
def no_price_list_fetch(monkeypatch: pytest.MonkeyPatch) -> None:
    """DSPy (as LiteLLM) fetches a model price list when an LM is made, unless told."""
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def predict(lm: Any, question: str) -> Any:
    program = dspy.Predict("question -> answer")
    with dspy.context(lm=lm, adapter=TolerantChatAdapter()):
        return program(question=question)


def test_dspy_lm_over_http_on_gemma(rig: Rig) -> None:
    before = len(rig.jobs(GEMMA))
    lm = dspy.LM(
        f"openai/{GEMMA}",
        api_base=rig.server.url + "/v1",
        api_key=rig.key,
        max_tokens=24,
        temperature=0,
        cache=False,
        num_retries=0,
    )
    answer = predict(lm, QUESTIONS[0]).answer
    raw = lm.history[-1]["outputs"][0]  # what the model wrote, markers or not
    assert isinstance(answer, str) and answer.strip() and answer in raw, raw
    jobs = rig.jobs(GEMMA)
    assert len(jobs) == before + 1
    assert (jobs[0]["status"], jobs[0]["model"], jobs[0]["cached"]) == ("completed", GEMMA, False)


def test_jobs_lm_on_gemma_survives_a_restart(rig: Rig) -> None:
    """`dspy.Evaluate` (2 threads) over the questions; then a new LM, as after a
    restart, evaluates again: no new job, the same answers."""
    devset = [dspy.Example(question=q).with_inputs("question") for q in QUESTIONS]

    def answered(example: Any, prediction: Any, trace: Any = None) -> bool:
        return isinstance(prediction.answer, str) and bool(prediction.answer.strip())

    def evaluate(name: str) -> list[str]:
        lm = jobs_lm(
            GEMMA,
            base_url=rig.server.url,
            api_key=rig.key,
            run=name,
            server_cache="skip",  # Gemma answers, not the cache of the HTTP test's answer
            max_tokens=24,
            temperature=0,
        )
        evaluation = dspy.Evaluate(devset=devset, metric=answered, num_threads=2)
        try:
            with dspy.context(lm=lm, adapter=TolerantChatAdapter()):
                result = evaluation(dspy.Predict("question -> answer"))
        finally:
            lm.engine.close()
        raw = [entry["outputs"][0] for entry in lm.history]  # what the model wrote
        answers = [prediction.answer for _, prediction, _ in result.results]
        assert result.score == 100.0, raw
        assert all(any(a in r for r in raw) for a in answers), (answers, raw)
        return answers

    before = len(rig.jobs(GEMMA))
    first = evaluate("restart-test")
    jobs = rig.jobs(GEMMA)
    assert len(jobs) == before + 2
    assert {(j["status"], j["cached"]) for j in jobs[:2]} == {("completed", False)}
    assert {j["metadata"]["run"] for j in jobs[:2]} == {"restart-test"}

    assert evaluate("restart-test") == first  # a new LM, as after a restart: the same jobs
    assert len(rig.jobs(GEMMA)) == before + 2


def test_jobs_lm_async_from_two_loops_and_threads(rig: Rig) -> None:
    lm = jobs_lm("echo", base_url=rig.server.url, api_key=rig.key, run="async-threads")
    before = len(rig.jobs("echo"))
    try:
        assert asyncio.run(lm.acall("first loop")) == ["first loop"]
        assert asyncio.run(lm.acall("second loop")) == ["second loop"]
        prompts = [f"thread call {i}" for i in range(24)]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda p: lm(p)[0], prompts))
        assert answers == prompts
        assert len(rig.jobs("echo")) == before + 26
        assert lm("first loop") == ["first loop"]  # found again: no new job
        assert len(rig.jobs("echo")) == before + 26
    finally:
        lm.engine.close()
    other = jobs_lm("echo", base_url=rig.server.url, api_key=rig.key, run="another-run")
    try:
        assert other("first loop") == ["first loop"]  # another run's name: a new job
    finally:
        other.engine.close()
    assert len(rig.jobs("echo")) == before + 27


def test_jobs_lm_rollouts_and_candidates_are_jobs_of_their_own(rig: Rig) -> None:
    """An optimizer's `lm.copy(rollout_id=i, temperature=1.0)` and a call with `n=3`
    each get jobs of their own (the same request otherwise), found again on a re-run."""
    lm = jobs_lm("echo", base_url=rig.server.url, api_key=rig.key, run="rollouts")
    before = len(rig.jobs("echo"))
    try:
        for _ in range(2):  # the second time round finds every job again
            assert lm("sampled") == ["sampled"]
            for rollout in (1, 2):
                assert lm.copy(rollout_id=rollout, temperature=1.0)("sampled") == ["sampled"]
            assert lm("sampled", n=3) == ["sampled"] * 3
            assert len(rig.jobs("echo")) == before + 5  # 1, 2 rollouts, 2 more candidates
    finally:
        lm.engine.close()


def test_jobs_lm_passes_knobs(rig: Rig) -> None:
    """Priority and metadata (with the run's name) reach the job; at temperature 0 the
    server's response cache answers another run's same request, unless told "skip"."""
    request = dspy.lm15.Request(  # an explicit Request carries its own settings
        model="echo",
        messages=(dspy.lm15.Message.user("knobs"),),
        config=dspy.lm15.Config(temperature=0),
    )

    def ask(run: str, **knobs: Any) -> dict[str, Any]:
        lm = jobs_lm("echo", base_url=rig.server.url, api_key=rig.key, run=run, **knobs)
        try:
            response = lm(request)
        finally:
            lm.engine.close()
        assert response.text == "knobs"
        return dict(rig.http.get(f"/v1/jobs/{response.id}").json())

    first = ask("knobs", priority=3, metadata={"suite": "recipes"})
    assert first["model"] == "echo" and first["priority"] == 3
    assert first["metadata"] == {"suite": "recipes", "run": "knobs"}
    assert first["cached"] is False
    again = ask("knobs-again")
    assert again["id"] != first["id"] and again["cached"] is True
    skipped = ask("knobs-skip", server_cache="skip")
    assert skipped["cached"] is False


def test_jobs_lm_resubmits_a_job_an_earlier_run_left_cancelled(rig: Rig) -> None:
    request = dspy.lm15.Request(model="echo-slow", messages=(dspy.lm15.Message.user("again"),))
    options = JobOptions(run="cancelled-before")
    body = chat_body(request)
    key = idempotency_key(body, options.knobs(), options.run)
    r = rig.http.post(
        "/v1/chat/completions",
        json={**body, **options.knobs()},
        headers={"Prefer": "respond-async", "Idempotency-Key": key},
    )
    assert r.status_code == 202, r.text
    old = r.json()["id"]
    assert rig.http.post(f"/v1/jobs/{old}/cancel").json()["status"] == "cancelled"

    lm = jobs_lm("echo-slow", base_url=rig.server.url, api_key=rig.key, options=options)
    try:
        response = lm(request)
        assert response.text == "again" and response.id != old
        assert lm(request).id == response.id  # the new job is found again
    finally:
        lm.engine.close()


def test_jobs_lm_saved_without_its_key_loads_and_answers(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = jobs_lm("echo", base_url=rig.server.url, api_key=rig.key, run="saved", priority=2)
    state = lm.dump_state()
    lm.engine.close()
    assert rig.key not in json.dumps(state)
    assert state["engine"]["state"]["options"]["run"] == "saved"
    monkeypatch.setenv("OPENBEEPBOOP_API_KEY", rig.key)
    loaded = dspy.LM.load_state(state, allow_custom_lm_class=True)
    try:
        assert loaded("saved and loaded") == ["saved and loaded"]
    finally:
        loaded.engine.close()
