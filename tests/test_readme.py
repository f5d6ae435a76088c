"""Follow the README as a newcomer would, from a fresh clone: its run command, then the
shell and Python snippets exactly as printed, answered by the real Gemma model.

Installation reuses the packages already installed (the Makefile's install step is
skipped by pointing it at this interpreter's environment): the point is the README's
commands and snippets, not pip.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def block(readme: str, name: str) -> str:
    """The code block that follows `<!-- readme-test: NAME -->`."""
    found = re.search(rf"<!-- readme-test: {name} -->\s*```\w*\n(.*?)```", readme, re.S)
    assert found, f"README has no block marked readme-test: {name}"
    return found.group(1)


def test_quickstart_opens_with_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1]
    first = re.search(r"```bash\n(.*?)```", quickstart, re.S)
    assert first is not None
    commands = [line.split("#")[0].strip() for line in first.group(1).splitlines()]
    assert [c for c in commands if c] == ["make run", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_node_config_in_the_docs_is_valid() -> None:
    """The TOML node configs shown in the README and docs load as they are printed."""
    import tomllib

    from openbeepboop.node.config import NodeConfig

    shown = 0
    for doc in (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))):
        for text in re.findall(r"```toml\n(.*?)```", doc.read_text(), re.S):
            if "[[models]]" not in text:
                continue
            data = tomllib.loads(text)
            data.setdefault("server", {"url": "http://127.0.0.1:8000", "api_key": "k"})
            assert NodeConfig.model_validate(data).models, doc
            shown += 1
    assert shown >= 2


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("readme") / "openbeepboop"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(target)], check=True)
    # "installation may reuse the packages already installed": .venv is this environment
    venv = target / ".venv"
    if (Path(sys.prefix) / "bin" / "activate").exists():
        venv.symlink_to(sys.prefix)
    else:
        (venv / "bin").mkdir(parents=True)
        (venv / "bin" / "activate").write_text(
            f'export PATH="{Path(sys.executable).parent}:$PATH"\n'
        )
    return target


@pytest.fixture(scope="module")
def running(clone: Path) -> Iterator[dict[str, str]]:
    """`make run` from the clone, with its own data directory and port."""
    port = free_port()
    env = {
        **os.environ,
        "XDG_DATA_HOME": str(clone.parent / "xdg-data"),
        "XDG_STATE_HOME": str(clone.parent / "xdg-state"),
        "OPENBEEPBOOP_PORT": str(port),
    }
    env.pop("OPENBEEPBOOP_API_KEY", None)
    env.pop("OPENBEEPBOOP_DATA_DIR", None)
    log = clone.parent / "make-run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["make", "run", f"VENV={sys.prefix}", "INSTALL_STAMP="],
            cwd=clone,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        key_file = Path(env["XDG_DATA_HOME"]) / "openbeepboop" / "client.key"
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "make run did not come up:\n" + log.read_text()
            try:
                key = key_file.read_text().strip()
                models = httpx.get(
                    f"{url}/v1/models", timeout=2, headers={"Authorization": f"Bearer {key}"}
                ).json()["data"]
                if any(m["id"] == "gemma-3-270m" for m in models):
                    break
            except (OSError, httpx.HTTPError, KeyError):
                pass
            time.sleep(0.3)
        assert "client key: obb_client_" in log.read_text()  # printed once, on first start
        yield {**env, "OPENBEEPBOOP_BASE_URL": url}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # as Ctrl+C in the terminal would
        proc.wait(timeout=60)  # make itself dies of the signal; the server must stop cleanly
        text = log.read_text()
        assert "Finished server process" in text and "Traceback" not in text, text


def run_snippet(clone: Path, env: dict[str, str], name: str, runner: list[str]) -> str:
    """Run the README's block `name` exactly as printed; its stdout."""
    snippet = block((clone / "README.md").read_text(), name)
    out = subprocess.run(
        [*runner, snippet], cwd=clone, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_readme_shell_snippet(clone: Path, running: dict[str, str]) -> None:
    stdout = run_snippet(clone, running, "cli", ["bash", "-e", "-c"])
    answer, _, status = stdout.partition("model ")
    assert answer.strip(), f"no answer from the model: {stdout!r}"
    assert "gemma-3-270m" in status and "live node" in status


def test_readme_python_snippet(clone: Path, running: dict[str, str]) -> None:
    stdout = run_snippet(clone, running, "python", [sys.executable, "-c"])
    first, _, answer = stdout.partition("\n")
    job_id, status = first.split()
    assert job_id.startswith("job_") and status in ("queued", "in_progress", "completed")
    assert answer.strip(), f"no answer from the model: {stdout!r}"
