"""Schemathesis over the whole OpenAPI schema against a real server with an admin key (it
may call every route): a bounded number of generated requests per operation, and not one
is answered with a 5xx. Waits are cut short (long-polls, synchronous requests with no
node), so that no example stalls the run."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from tests.conftest import ServerProcess, cli, free_port

EXAMPLES = 20  # per operation
# 5xx answers the API documents (docs/http-api.md): a synchronous request's job failed
# (502), no node serves its model (503), it outlived its wait (504)
DOCUMENTED_5XX = {502, 503, 504}


def no_server_error(ctx: Any, response: Any, case: Any) -> None:
    """No 500 (nor any undocumented 5xx), and every 5xx in OpenAI's error shape."""
    status = response.status_code
    if status < 500:
        return
    assert status in DOCUMENTED_5XX, f"{status} on {case.method} {case.path}"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data_dir: Path = tmp_path_factory.mktemp("fuzz") / "data"
    keys = cli("setup", "--non-interactive", "--data-dir", str(data_dir), "--json")
    env = {
        "OPENBEEPBOOP_RATE_LIMIT": "",
        "OPENBEEPBOOP_MAX_POLL_WAIT_SECONDS": "0.2",
        "OPENBEEPBOOP_MODEL_WAIT_SECONDS": "0.2",
        "OPENBEEPBOOP_SYNC_TIMEOUT_SECONDS": "1",
    }
    server = ServerProcess(data_dir, free_port(), keys, env)
    server.start()
    yield server
    server.kill(signal.SIGTERM)
    log = server.log.read_text()  # type: ignore[union-attr]
    assert "Traceback" not in log and "unhandled error" not in log, log[-4000:]


def test_no_generated_request_is_a_server_error(fuzzed_server: ServerProcess) -> None:
    """Each operation in turn (schemathesis's pytest plugin needs pytest < 9), every
    failure collected before the test fails."""
    schema = schemathesis.openapi.from_url(fuzzed_server.url + "/openapi.json")
    headers = {"Authorization": f"Bearer {fuzzed_server.keys['admin_key']}"}
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    document = httpx.get(fuzzed_server.url + "/openapi.json").json()
    assert len(operations) == sum(len(methods) for methods in document["paths"].values())

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,  # the same requests on every run: CI is repeatable
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any) -> None:
            case.call_and_validate(headers=headers, checks=[no_server_error], timeout=10)

        try:
            run()
        except (Exception, BaseExceptionGroup) as exc:  # a failing check: name it, go on
            failures.append(f"{operation.label}: {exc}")
    assert failures == []
