"""`openbeepboop-client` against a real `openbeepboop serve` on loopback: every command,
clean `--json` on stdout, exit codes, and resumable `submit --file` batches."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.allinone import AllInOne, all_in_one
from tests.conftest import free_port

pytestmark = pytest.mark.slow

UNSERVED = "nobody-serves-this"
JOB_ID = re.compile(r"^job_[0-9a-f]+$")


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AllInOne]:
    with all_in_one(tmp_path_factory.mktemp("serve") / "data") as server:
        yield server


def env_for(serve: AllInOne, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENBEEPBOOP_")}
    env.update(OPENBEEPBOOP_BASE_URL=serve.url, OPENBEEPBOOP_API_KEY=serve.key)
    env["OPENBEEPBOOP_STATE_DIR"] = str(serve.data_dir.parent / "runs")
    env.update(extra)
    return env


def run(
    serve: AllInOne, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "openbeepboop.cli.client", *args],
        capture_output=True,
        text=True,
        env=env or env_for(serve),
        cwd=cwd,
        timeout=90,
        check=False,
    )


def ok(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 0, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    return out.stdout


def one_json(out: subprocess.CompletedProcess[str]) -> Any:
    """stdout holds exactly one JSON document and nothing else."""
    assert out.stdout.endswith("\n") and out.stdout.count("\n") == 1, out.stdout
    return json.loads(out.stdout)


def submit_id(serve: AllInOne, prompt: str, model: str = "echo") -> str:
    job_id = ok(run(serve, "submit", prompt, "--model", model)).strip()
    assert JOB_ID.match(job_id), job_id
    return job_id


def one_line_error(out: subprocess.CompletedProcess[str], code: int) -> str:
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    assert out.stdout == ""
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    return lines[0]


# -- submit and poll ----------------------------------------------------------------------


def test_submit_prints_a_job_id_and_poll_wait_prints_the_answer(serve: AllInOne) -> None:
    out = run(serve, "submit", "hello from the cli", "--model", "echo")
    job_id = ok(out).strip()
    assert JOB_ID.match(job_id) and out.stdout == job_id + "\n"
    assert ok(run(serve, "poll", job_id, "--wait")) == "hello from the cli\n"
    assert ok(run(serve, "poll", job_id)) == "hello from the cli\n"  # done: the answer


def test_submit_wait_prints_the_answer(serve: AllInOne) -> None:
    out = run(serve, "submit", "an answer please", "--model", "echo", "--wait")
    assert ok(out) == "an answer please\n"
    assert "waiting" in out.stderr  # progress goes to stderr


def test_readme_cli_example_on_the_default_gemma_model(serve: AllInOne) -> None:
    out = run(serve, "submit", "Hello world", "--wait")  # the README's line, as written
    assert ok(out).strip()
    job_id = re.search(r"job_[0-9a-f]+", out.stderr)
    assert job_id, out.stderr
    data = one_json(run(serve, "poll", job_id.group(), "--json"))
    assert data["model"] == "gemma-3-270m" and data["status"] == "completed"
    assert out.stdout.strip() == data["result"]["choices"][0]["message"]["content"].strip()


def test_json_everywhere_is_clean_on_stdout(serve: AllInOne) -> None:
    queued = one_json(run(serve, "submit", "json me", "--model", "echo", "--json"))
    assert JOB_ID.match(queued["id"]) and queued["status"] in ("queued", "in_progress", "completed")

    waited = one_json(run(serve, "submit", "json wait", "--model", "echo", "--wait", "--json"))
    assert waited["status"] == "completed"
    assert waited["result"]["choices"][0]["message"]["content"] == "json wait"

    polled = one_json(run(serve, "poll", queued["id"], "--wait", "--json"))
    assert polled["id"] == queued["id"] and polled["status"] == "completed"
    assert polled["result"]["choices"][0]["message"]["content"] == "json me"
    assert one_json(run(serve, "poll", queued["id"], "--json"))["status"] == "completed"
    assert one_json(run(serve, "get", queued["id"], "--json"))["id"] == queued["id"]

    listed = one_json(run(serve, "list", "--limit", "2", "--json"))
    assert [j["id"] for j in listed] == [waited["id"], queued["id"]]

    models = one_json(run(serve, "models", "--json"))
    assert {"echo", "gemma-3-270m"} <= {m["id"] for m in models}

    status = one_json(run(serve, "status", "--json"))
    assert status["stats"]["models"]["echo"]["completed"] >= 2
    served = {m["name"] for n in status["nodes"] for m in n["models"]}
    assert {"echo", "gemma-3-270m"} <= served

    cancelled = one_json(run(serve, "cancel", submit_id(serve, "x", UNSERVED), "--json"))
    assert cancelled["status"] == "cancelled"


def test_submit_cache_option(serve: AllInOne) -> None:
    body = {"model": "echo", "temperature": 0, "messages": [{"role": "user", "content": "cache"}]}
    headers = {"Authorization": f"Bearer {serve.key}"}
    for _ in range(2):  # the second is answered by the cache
        r = httpx.post(serve.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert r.status_code == 200 and r.headers["x-openbeepboop-cache"] == "hit"
    args = ["submit", "cache", "--model", "echo", "--temperature", "0", "--json"]
    refreshed = one_json(run(serve, *args, "--cache", "refresh"))
    assert refreshed["cached"] is False  # a refresh runs on a node again


def test_poll_get_cancel_list_models_status_as_text(serve: AllInOne) -> None:
    job_id = submit_id(serve, "stay queued", UNSERVED)
    assert ok(run(serve, "poll", job_id)) == "queued\n"
    shown = ok(run(serve, "get", job_id))
    assert re.search(rf"^id\s+{job_id}$", shown, re.M)
    assert re.search(r"^status\s+queued$", shown, re.M)
    assert re.search(rf"^model\s+{UNSERVED}$", shown, re.M)

    listed = ok(run(serve, "list", "--limit", "1"))
    assert listed.startswith(job_id) and listed.count("\n") == 1

    assert ok(run(serve, "cancel", job_id)) == f"{job_id} cancelled\n"
    polled = run(serve, "poll", job_id)
    assert polled.returncode == 1 and polled.stdout.startswith("cancelled")
    assert run(serve, "poll", job_id, "--wait").returncode == 1
    assert re.search(r"^status\s+cancelled$", ok(run(serve, "get", job_id)), re.M)

    models = ok(run(serve, "models"))
    assert re.search(r"^echo\s+1 node", models, re.M)
    assert re.search(r"^gemma-3-270m\s+1 node", models, re.M)
    status = ok(run(serve, "status"))
    assert "live node" in status and "echo" in status and UNSERVED in status


# -- exit codes ---------------------------------------------------------------------------


def test_exit_3_when_the_server_is_unreachable(serve: AllInOne) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    out = run(
        serve, "submit", "hi", "--model", "echo", env=env_for(serve, OPENBEEPBOOP_BASE_URL=url)
    )
    assert time.monotonic() - started < 20
    line = one_line_error(out, 3)
    assert url in line


def test_exit_4_for_a_bad_key_and_no_key(serve: AllInOne, tmp_path: Path) -> None:
    bad = env_for(serve, OPENBEEPBOOP_API_KEY="obb_client_not-a-real-key")
    assert "invalid" in one_line_error(run(serve, "list", env=bad), 4).lower()
    empty = tmp_path / "empty"
    empty.mkdir()
    none = env_for(serve, HOME=str(empty), XDG_DATA_HOME=str(empty))
    none.pop("OPENBEEPBOOP_API_KEY")
    none["OPENBEEPBOOP_DATA_DIR"] = str(empty)
    line = one_line_error(run(serve, "list", env=none), 4)
    assert "OPENBEEPBOOP_API_KEY" in line


def test_common_options_before_the_command_and_after_it(serve: AllInOne) -> None:
    bad = env_for(serve, OPENBEEPBOOP_API_KEY="obb_client_not-a-real-key")
    bad.pop("OPENBEEPBOOP_BASE_URL")
    # before the command: they beat the environment
    models = one_json(
        run(serve, "--base-url", serve.url, "--api-key", serve.key, "--json", "models", env=bad)
    )
    assert "echo" in {m["id"] for m in models}
    # after the command they win over those given before it
    out = run(
        serve,
        "--api-key",
        serve.key,
        "list",
        "--api-key",
        "obb_client_nope",
        "--base-url",
        serve.url,
        env=bad,
    )
    assert "invalid" in one_line_error(out, 4).lower()


def test_exit_5_for_an_unknown_job(serve: AllInOne) -> None:
    for command in ("poll", "get", "cancel"):
        line = one_line_error(run(serve, command, "job_nope"), 5)
        assert "job_nope" in line
    assert one_line_error(run(serve, "poll", "job_nope", "--json"), 5)  # nothing on stdout


def test_exit_6_when_a_wait_times_out(serve: AllInOne) -> None:
    started = time.monotonic()
    out = run(serve, "submit", "never", "--model", UNSERVED, "--wait", "--timeout", "1")
    assert out.returncode == 6, (out.stdout, out.stderr)
    assert out.stdout == "" and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: ")
    assert time.monotonic() - started < 10
    job_id = re.search(r"job_[0-9a-f]+", out.stderr)
    assert job_id
    assert run(serve, "poll", job_id.group(), "--wait", "--timeout", "1").returncode == 6
    ok(run(serve, "cancel", job_id.group()))


def test_exit_1_when_the_awaited_job_is_cancelled(serve: AllInOne) -> None:
    args = ["submit", "wait for me", "--model", UNSERVED, "--wait", "--timeout", "60"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "openbeepboop.cli.client", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env_for(serve),
    )
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
        job_id = re.search(r"job_[0-9a-f]+", first)
        assert job_id, first
        ok(run(serve, "cancel", job_id.group()))
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, (stdout, stderr)
    assert stdout == "" and "Traceback" not in stderr
    assert stderr.strip().startswith("error: ") and "cancelled" in stderr


# -- submit --file ------------------------------------------------------------------------


def batch_line(custom_id: str, content: str, **body: Any) -> str:
    line = {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"messages": [{"role": "user", "content": content}], **body},
    }
    return json.dumps(line)


MIXED = [
    batch_line("chat-1", "alpha"),
    json.dumps(
        {
            "custom_id": "text-1",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "echo", "prompt": "beta"},
        }
    ),
    batch_line("chat-2", "gamma", model="echo", max_tokens=50),
    json.dumps({"prompt": "delta", "custom_id": "obj-1"}),
    json.dumps({"prompt": "epsilon"}),
    json.dumps("zeta, a JSON string"),
    "",
    "eta, plain text — naïve ✓",
    batch_line("chat-3", "theta"),
]
EXPECTED = {
    "chat-1": "alpha",
    "text-1": "beta",
    "chat-2": "gamma",
    "obj-1": "delta",
    "line-5": "epsilon",
    "line-6": "zeta, a JSON string",
    "line-8": "eta, plain text — naïve ✓",
    "chat-3": "theta",
}


def read_output(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_output(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    by_id = {line["custom_id"]: line for line in lines}
    assert len(by_id) == len(lines), "a custom_id is written twice"
    assert set(by_id) == set(EXPECTED)
    for custom_id, line in by_id.items():
        assert set(line) == {"id", "custom_id", "response", "error"}
        assert line["error"] is None
        response = line["response"]
        assert response["status_code"] == 200 and response["request_id"] == line["id"]
        body = response["body"]
        if custom_id == "text-1":
            assert body["object"] == "text_completion"
            assert body["choices"][0]["text"] == EXPECTED[custom_id]
        else:
            assert body["object"] == "chat.completion"
            assert body["choices"][0]["message"]["content"] == EXPECTED[custom_id]
    return by_id


def test_submit_file_writes_openai_batch_output_and_resumes(
    serve: AllInOne, tmp_path: Path
) -> None:
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(MIXED) + "\n")
    output = tmp_path / "requests.results.jsonl"
    jobs_before = serve.job_count()

    out = run(serve, "submit", "--file", str(requests), "--model", "echo")
    assert ok(out) == ""  # data goes to the file, progress to stderr
    assert "8 completed" in out.stderr
    first = check_output(read_output(output))
    assert serve.job_count() == jobs_before + 8

    # the same command again: nothing new is submitted, the output stays as it is
    before = output.read_bytes()
    summary = one_json(run(serve, "submit", "--file", str(requests), "--model", "echo", "--json"))
    assert summary["submitted"] == 0 and summary["skipped"] == 8
    assert output.read_bytes() == before
    assert serve.job_count() == jobs_before + 8

    # an interrupted run: two results never written, and a last line torn mid-write
    lines = before.decode().splitlines(keepends=True)
    lost = {json.loads(lines[i])["custom_id"] for i in (1, 4, len(lines) - 1)}
    kept = [line for i, line in enumerate(lines) if i not in (1, 4, len(lines) - 1)]
    output.write_text("".join(kept) + lines[-1][: len(lines[-1]) // 2])
    summary = one_json(run(serve, "submit", "--file", str(requests), "--model", "echo", "--json"))
    assert summary["submitted"] == 3 and summary["skipped"] == 5
    again = check_output(read_output(output))  # every line whole, each custom_id once
    assert {k: v["id"] for k, v in again.items()} == {k: v["id"] for k, v in first.items()}
    assert {json.loads(line)["custom_id"] for line in output.read_text().splitlines()[-3:]} == lost
    assert serve.job_count() == jobs_before + 8  # the same jobs, found again by idempotency


def test_submit_file_elsewhere_says_it_reuses_and_fresh_runs_again(
    serve: AllInOne, tmp_path: Path
) -> None:
    first_dir, second_dir = tmp_path / "a", tmp_path / "b"
    first_dir.mkdir()
    second_dir.mkdir()
    content = "\n".join(MIXED) + "\n"
    (first_dir / "r.jsonl").write_text(content)
    (second_dir / "r.jsonl").write_text(content)
    ok(run(serve, "submit", "--file", "r.jsonl", "--model", "echo", cwd=first_dir))
    first = {x["custom_id"]: x["id"] for x in read_output(first_dir / "r.results.jsonl")}
    jobs_before = serve.job_count()

    # the same content from another directory: the earlier jobs, and a note saying so
    out = run(serve, "submit", "--file", "r.jsonl", "--model", "echo", "--json", cwd=second_dir)
    assert one_json(out)["reused"] == 8
    assert "note: 8 of 8 requests were submitted by an earlier run" in out.stderr
    again = {x["custom_id"]: x["id"] for x in read_output(second_dir / "r.results.jsonl")}
    assert again == first and serve.job_count() == jobs_before

    # --fresh: new jobs, and a fresh run repeated with --fresh resumes instead of re-running
    (second_dir / "r.results.jsonl").unlink()
    out = run(serve, "submit", "--file", "r.jsonl", "--model", "echo", "--fresh", cwd=second_dir)
    assert "note:" not in ok(out) + out.stderr
    fresh = check_output(read_output(second_dir / "r.results.jsonl"))
    assert {k: v["id"] for k, v in fresh.items()}.keys() == first.keys()
    assert not {v["id"] for v in fresh.values()} & set(first.values())
    assert serve.job_count() == jobs_before + 8
    (second_dir / "r.results.jsonl").unlink()
    ok(run(serve, "submit", "--file", "r.jsonl", "--model", "echo", "--fresh", cwd=second_dir))
    assert serve.job_count() == jobs_before + 8


def test_submit_file_with_embeddings_lines(serve: AllInOne, tmp_path: Path) -> None:
    requests = tmp_path / "emb.jsonl"
    line = {"url": "/v1/embeddings", "body": {"input": ["a", "b"], "encoding_format": "float"}}
    requests.write_text(
        json.dumps({"custom_id": "e-1", **line}) + "\n" + batch_line("chat-1", "alpha") + "\n"
    )
    ok(run(serve, "submit", "--file", str(requests), "--model", "echo"))
    by_id = {x["custom_id"]: x for x in read_output(tmp_path / "emb.results.jsonl")}
    body = by_id["e-1"]["response"]["body"]
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1]
    assert len(body["data"][0]["embedding"]) == 256
    assert by_id["chat-1"]["response"]["body"]["choices"][0]["message"]["content"] == "alpha"


def test_submit_file_to_a_named_output(serve: AllInOne, tmp_path: Path) -> None:
    requests = tmp_path / "in.jsonl"
    requests.write_text("".join(f"prompt number {i}\n" for i in range(30)))
    output = tmp_path / "elsewhere" / "out.jsonl"
    output.parent.mkdir()
    summary = one_json(
        run(serve, "submit", "--file", str(requests), "-o", str(output), "-m", "echo", "--json")
    )
    assert summary == {
        "completed": 30,
        "failed": 0,
        "skipped": 0,
        "submitted": 30,
        "reused": 0,
        "output": str(output),
    }
    lines = read_output(output)
    assert sorted(line["custom_id"] for line in lines) == sorted(f"line-{i}" for i in range(1, 31))
    for line in lines:
        number = int(line["custom_id"].removeprefix("line-"))
        content = line["response"]["body"]["choices"][0]["message"]["content"]
        assert content == f"prompt number {number - 1}"
    assert not (tmp_path / "in.results.jsonl").exists()


@pytest.mark.parametrize(
    ("bad_line", "says"),
    [
        ("[1, 2, 3]", "line 3"),
        ('{"custom_id": "torn", "method": "POST", "body": {"messages": [', "line 3"),
        ('{"custom_id": "e", "url": "/v1/moderations", "body": {"input": "x"}}', "line 3"),
        ('{"custom_id": "nothing to run"}', "line 3"),
        (batch_line("chat-1", "a second chat-1"), "chat-1"),
    ],
)
def test_submit_file_with_a_malformed_line_submits_nothing(
    serve: AllInOne, tmp_path: Path, bad_line: str, says: str
) -> None:
    requests = tmp_path / "bad.jsonl"
    requests.write_text("\n".join([batch_line("chat-1", "fine"), "also fine", bad_line, "ok"]))
    jobs_before = serve.job_count()
    out = run(serve, "submit", "--file", str(requests), "--model", "echo")
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert says in out.stderr and "Traceback" not in out.stderr
    assert out.stdout == ""
    assert serve.job_count() == jobs_before
    assert not (tmp_path / "bad.results.jsonl").exists()
