"""The llama.cpp backend honours what a request asks, or refuses it with a 400 naming the
parameter: a server and a node on the bundled Gemma 3 270M, asked through the sync path
(and the async one for a refusal). One server and node serve the whole module; answers
are kept short (the model is real and the machine may be busy)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest
import tomli_w

from tests.conftest import ServerProcess, cli, free_port

MODEL = "gemma-3-270m"
ASK = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    root = tmp_path_factory.mktemp("llama")
    keys = cli("setup", "--non-interactive", "--data-dir", str(root / "server"), "--json")
    server = ServerProcess(root / "server", free_port(), keys, {"OPENBEEPBOOP_RATE_LIMIT": ""})
    server.start()
    config = {
        "server": {"url": server.url, "api_key": keys["node_key"]},
        "node": {"name": "llama-params", "state_dir": str(root / "node")},
        "models": [{"name": MODEL, "backend": "llama_cpp", "n_ctx": 1024}],
    }
    (root / "node.toml").write_text(tomli_w.dumps(config))
    with (root / "node.log").open("wb") as log:
        node = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "openbeepboop.cli.node",
                "run",
                "--config",
                str(root / "node.toml"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
        )
    client = httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {keys['client_key']}"}, timeout=180
    )
    try:
        deadline = time.monotonic() + 120
        while not any(m["id"] == MODEL for m in client.get("/v1/models").json()["data"]):
            assert node.poll() is None, (root / "node.log").read_text()
            assert time.monotonic() < deadline, "the Gemma node did not come up"
            time.sleep(0.2)
        yield client
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(timeout=60)
        client.close()
        server.kill(signal.SIGTERM)


def chat(http: httpx.Client, **body: Any) -> dict[str, Any]:
    r = http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": ASK, "max_tokens": 8, "temperature": 0, **body},
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_json_schema_answers_parse_and_validate(http: httpx.Client) -> None:
    schema = {
        "type": "object",
        "properties": {
            "colour": {"type": "string", "enum": ["red", "green", "blue"]},
            "bright": {"type": "boolean"},
        },
        "required": ["colour", "bright"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "colour", "schema": schema}}
    answer = chat(http, response_format=fmt, max_tokens=40)
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "stop", answer
    jsonschema.validate(json.loads(choice["message"]["content"]), schema)

    anything = chat(http, response_format={"type": "json_object"}, max_tokens=6)
    assert anything["choices"][0]["message"]["content"].lstrip().startswith("{")


def test_logprobs_are_the_answers_tokens(http: httpx.Client) -> None:
    answer = chat(http, logprobs=True, top_logprobs=3, max_tokens=6)
    choice = answer["choices"][0]
    content = choice["logprobs"]["content"]
    assert "".join(t["token"] for t in content) == choice["message"]["content"]
    for t in content:
        assert bytes(t["bytes"]) == t["token"].encode()
        assert t["logprob"] <= 0
        tops = t["top_logprobs"]
        assert len(tops) == 3
        assert [x["logprob"] for x in tops] == sorted((x["logprob"] for x in tops), reverse=True)
        assert tops[0]["token"] == t["token"]  # temperature 0: the likeliest token is taken
        assert tops[0]["logprob"] == pytest.approx(t["logprob"])
    # usage is llama.cpp's token count: here every token made is in the answer
    if choice["finish_reason"] == "length":
        assert answer["usage"]["completion_tokens"] == len(content) == 6

    plain = chat(http, logprobs=True, max_tokens=3)["choices"][0]["logprobs"]["content"]
    assert plain and all(t["top_logprobs"] == [] for t in plain)


def test_n_gives_several_generations(http: httpx.Client) -> None:
    answer = chat(http, n=2, temperature=1.0, seed=7, max_tokens=5, logprobs=True)
    choices = answer["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert all(c["message"]["content"] for c in choices)
    made = sum(len(c["logprobs"]["content"]) for c in choices)
    assert answer["usage"]["completion_tokens"] >= made > 0
    assert answer["usage"]["prompt_tokens"] > 0
    again = chat(http, n=2, temperature=1.0, seed=7, max_tokens=5)
    assert [c["message"]["content"] for c in again["choices"]] == [
        c["message"]["content"] for c in choices
    ]  # a seed makes the answers repeatable


def test_forced_tool_choice_calls_the_tool(http: httpx.Client) -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "paint",
            "parameters": {
                "type": "object",
                "properties": {"colour": {"type": "string", "enum": ["red", "blue"]}},
                "required": ["colour"],
            },
        },
    }
    answer = chat(
        http,
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "paint"}},
        max_tokens=30,
    )
    message = answer["choices"][0]["message"]
    assert message["content"] is None
    (call,) = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "paint"
    assert json.loads(call["function"]["arguments"])["colour"] in ("red", "blue")


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "unsupported_parameter"),
        ({"top_logprobs": 2}, "top_logprobs", "unsupported_parameter"),
        ({"response_format": {"type": "xml"}}, "response_format.type", "invalid_value"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0].type",
            "unsupported_content",
        ),
    ],
)
def test_what_it_cannot_do_is_a_400_naming_the_parameter(
    http: httpx.Client, body: dict[str, Any], param: str, code: str
) -> None:
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code)
    assert error["message"]


def test_a_refused_async_job_fails_with_the_parameter(http: httpx.Client) -> None:
    r = http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": ASK, "prediction": {"type": "content", "content": "x"}},
        headers={"Prefer": "respond-async"},
    )
    assert r.status_code == 202
    job_id = r.json()["id"]
    deadline = time.monotonic() + 60
    job = http.post("/v1/results/poll", json={"ids": [job_id], "wait": 30}).json()["data"][0]
    while job["status"] in ("queued", "running") and time.monotonic() < deadline:
        job = http.post("/v1/results/poll", json={"ids": [job_id], "wait": 10}).json()["data"][0]
    assert job["status"] == "failed", job
    error = job["error"]
    assert (error["code"], error["param"], error["retryable"]) == (
        "unsupported_parameter",
        "prediction",
        False,
    )


def test_completion_logprobs_and_echo(http: httpx.Client) -> None:
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
    r = http.post("/v1/completions", json={**body, "logprobs": 2})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert all(len(top) <= 2 for top in logprobs["top_logprobs"])
    assert len(logprobs["token_logprobs"]) == len(logprobs["tokens"])

    r = http.post("/v1/completions", json={**body, "echo": True, "stop": ["\n"]})
    assert r.json()["choices"][0]["text"].startswith("The capital of France is")


# -- without the model: what the request reader refuses, and stop strings across tokens --


def test_stop_strings_are_held_back_across_tokens() -> None:
    from openbeepboop.node.backends.llama_generate import _Gate

    gate = _Gate(["<end>", "\n\n"])
    pieces = [b"Red", b", blue", b" <e", b"n", b"d> more"]
    out = [gate.feed(p) for p in pieces]
    assert out == ["Red", ", blue", " ", "", ""]
    assert gate.stopped and gate.rest() == ""

    gate = _Gate(["<end>"])
    assert gate.feed(b"caf\xc3") == "caf"  # half a character waits for its other byte
    assert gate.feed(b"\xa9 <e") == "\u00e9 "
    assert gate.rest() == "<e" and not gate.stopped


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"n": 0}, "n"),
        ({"n": 129}, "n"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f"}}], "logprobs": True},
            "logprobs",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {}}},
            "response_format.json_schema.schema",
        ),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"stop": [1]}, "stop"),
    ],
)
def test_the_request_reader_names_what_it_refuses(body: dict[str, Any], param: str) -> None:
    from openbeepboop.node.backends.base import BackendError
    from openbeepboop.node.backends.llama_request import read_request

    with pytest.raises(BackendError) as refused:
        read_request("/v1/chat/completions", {"messages": ASK, **body}, 16)
    assert refused.value.param == param
    assert refused.value.status == 400 and not refused.value.retryable


def test_completion_refusals_and_prompt_lists() -> None:
    from openbeepboop.node.backends.base import BackendError
    from openbeepboop.node.backends.llama_request import read_request

    plan = read_request("/v1/completions", {"prompt": ["a", "b"], "n": 2, "logprobs": 0}, 16)
    assert plan.prompts == ["a", "b"] and plan.n == 2 and plan.logprobs
    for body, param in [
        ({"suffix": "x"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"echo": True, "logprobs": 1}, "echo"),
        ({"logprobs": 6}, "logprobs"),
    ]:
        with pytest.raises(BackendError) as refused:
            read_request("/v1/completions", {"prompt": "hi", **body}, 16)
        assert refused.value.param == param
