"""The client's environment: OPENAI_* as fallbacks of OPENBEEPBOOP_* (and the rule that
keeps an OpenAI key from going to another server), the batch runner's variables, bad
values named, and `--help` showing them all."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from openbeepboop.cli.client import main
from openbeepboop.client import AsyncClient
from openbeepboop.client.config import default_model, endpoint
from openbeepboop.client.run_state import state_dir
from openbeepboop.client.runs import RunOptions

BATCH_VARS = ("MAX_OUTSTANDING", "BATCH_NUM_WORKERS", "RPM", "TIMEOUT_S", "MAX_ATTEMPTS")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for name in list(os.environ):
        if name.startswith(("OPENBEEPBOOP_", "OPENAI_")) or name in (*BATCH_VARS, "CACHE_DIR"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OPENBEEPBOOP_DATA_DIR", str(tmp_path / "no-saved-key"))


def test_openai_variables_are_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://provider.example/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    monkeypatch.setenv("OPENAI_MODEL", "gpt-x")
    client = AsyncClient()
    assert (client.base_url, client.api_key, client.model) == (
        "http://provider.example",
        "sk-openai",
        "gpt-x",
    )
    monkeypatch.setenv("OPENBEEPBOOP_API_KEY", "obb-key")
    monkeypatch.setenv("OPENBEEPBOOP_MODEL", "llama3")
    assert endpoint().api_key == "obb-key" and default_model() == "llama3"
    assert default_model("given") == "given"


@pytest.mark.parametrize(
    "where",
    [{"env": "http://queue.example"}, {"arg": "http://queue.example"}],
    ids=["OPENBEEPBOOP_BASE_URL", "base_url argument"],
)
def test_an_openai_key_goes_only_to_the_openai_base_url(
    monkeypatch: pytest.MonkeyPatch, where: dict[str, str]
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://provider.example/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    if "env" in where:
        monkeypatch.setenv("OPENBEEPBOOP_BASE_URL", where["env"])
    client = AsyncClient(where.get("arg"))
    assert client.base_url == "http://queue.example"
    assert client.api_key is None and "Authorization" not in client._headers


def test_batch_variables_and_bad_values_named(monkeypatch: pytest.MonkeyPatch) -> None:
    assert RunOptions.from_env() == RunOptions()
    for name, value in zip(BATCH_VARS, ("50", "2", "600", "1.5", "1"), strict=True):
        monkeypatch.setenv(name, value)
    options = RunOptions.from_env(rpm=0)
    assert (options.max_outstanding, options.num_workers, options.rpm) == (50, 2, 0)
    assert (options.timeout_s, options.max_attempts) == (1.5, 1)
    for name, value, says in [
        ("MAX_OUTSTANDING", "lots", "MAX_OUTSTANDING must be an integer, not 'lots'"),
        ("RPM", "-3", "RPM must be at least 0, not '-3'"),
        ("TIMEOUT_S", "soon", "TIMEOUT_S must be a number, not 'soon'"),
        ("TIMEOUT_S", "nan", "TIMEOUT_S must be a finite number, not 'nan'"),
        ("TIMEOUT_S", "inf", "TIMEOUT_S must be a finite number, not 'inf'"),
    ]:
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match=says):
            RunOptions.from_env()
        monkeypatch.delenv(name)
    with pytest.raises(ValueError, match="max_outstanding must be at least 1"):
        RunOptions.from_env(max_outstanding=0)
    for name in ("timeout_s", "heartbeat_s", "wait_s"):
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):
            RunOptions.from_env(**{name: float("nan")})


def test_state_dir_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CACHE_DIR", str(tmp_path / "cache"))
    assert state_dir() == tmp_path / "cache" / "runs"
    monkeypatch.setenv("OPENBEEPBOOP_STATE_DIR", str(tmp_path / "state"))
    assert state_dir() == tmp_path / "state"


def test_help_shows_the_variables() -> None:
    runner = CliRunner()
    top = runner.invoke(main, ["--help"], terminal_width=200).output
    assert all(v in top for v in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "OPENBEEPBOOP_API_KEY"))
    submit = runner.invoke(main, ["submit", "--help"], terminal_width=200).output
    names = (*BATCH_VARS, "OPENAI_MODEL", "OPENAI_BASE_URL", "OPENBEEPBOOP_STATE_DIR")
    assert [n for n in names if n not in submit] == []


def test_a_bad_variable_is_one_clear_error(tmp_path: Path) -> None:
    requests = tmp_path / "r.jsonl"
    requests.write_text("hello\n")
    out = CliRunner().invoke(
        main, ["submit", "--file", str(requests)], env={"MAX_OUTSTANDING": "lots"}
    )
    assert out.exit_code == 2 and "MAX_OUTSTANDING" in out.output and "lots" in out.output
