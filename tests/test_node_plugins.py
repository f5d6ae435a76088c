"""Backends are plugins: a throwaway third-party backend (tests/plugin_backend, `reverse`)
is installed at test time as `pip install --target` lays a package out, then configured
only through `node_config.toml`, chosen in `openbeepboop-node setup`, and run end to end
through a real server and a real node process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pexpect
import pytest
import tomli_w

from openbeepboop.node.backends import backend_class, installed_backends
from openbeepboop.node.config import NodeConfigError, load_node_config, write_node_config
from tests.conftest import ServerProcess
from tests.nodes import (
    SERVER_LOG_WARNING,
    Procs,
    answer,
    child_env,
    echo_model,
    log_events,
    node_id_of,
    start_node,
    submit_chat,
    wait_jobs,
    write_config,
)

PLUGIN = Path(__file__).with_name("plugin_backend")
BUILT_IN = "echo, litellm, llama_cpp, openai, swarm"


def install_plugin(target: Path, project: Path = PLUGIN) -> Path:
    """`project` laid out in `target` as `pip install --no-deps --target` would: its
    modules, and a dist-info whose entry_points.txt declares what its pyproject.toml
    declares. Put `target` on the path and the entry points are there."""
    pyproject = tomllib.loads((project / "pyproject.toml").read_text())
    meta = pyproject["project"]
    target.mkdir(parents=True, exist_ok=True)
    for module in pyproject["tool"]["setuptools"]["py-modules"]:
        shutil.copy(project / f"{module}.py", target)
    info = target / f"{meta['name'].replace('-', '_')}-{meta['version']}.dist-info"
    info.mkdir()
    info.joinpath("METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n"
    )
    info.joinpath("entry_points.txt").write_text(entry_points_txt(meta["entry-points"]))
    return target


def entry_points_txt(groups: dict[str, dict[str, str]]) -> str:
    lines: list[str] = []
    for group, entries in groups.items():
        lines += [f"[{group}]", *(f"{name} = {value}" for name, value in entries.items()), ""]
    return "\n".join(lines)


@pytest.fixture
def plugin_site(tmp_path: Path) -> Path:
    """The plugin installed in a directory of its own (not on the path yet)."""
    return install_plugin(tmp_path / "site")


@pytest.fixture
def with_plugin(plugin_site: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The plugin visible to this process, for the length of the test."""
    monkeypatch.syspath_prepend(str(plugin_site))
    yield plugin_site
    sys.modules.pop("obb_reverse", None)


def plugin_path(site: Path) -> str:
    """A child's PYTHONPATH on which the plugin is installed."""
    return os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])


def plugin_env(site: Path) -> dict[str, str]:
    """A child's environment in which the plugin is installed."""
    return child_env(PYTHONPATH=plugin_path(site))


def reverse_model(**keys: object) -> dict[str, object]:
    return {"name": "rev", "backend": "reverse", "prefix": "<", **keys}


def config_file(path: Path, *models: dict[str, object]) -> Path:
    data = {"server": {"url": "http://127.0.0.1:9", "api_key": "obb_node_x"}, "models": models}
    path.write_text(tomli_w.dumps(data))
    return path


def load_error(path: Path) -> str:
    with pytest.raises(NodeConfigError) as caught:
        load_node_config(path)
    return str(caught.value)


# -- reading [[models]]: the backend's name, then the backend's own model --------------


def test_the_built_in_backends_are_entry_points() -> None:
    assert ", ".join(installed_backends()) == BUILT_IN
    assert backend_class("echo").__name__ == "EchoBackend"


def test_an_unknown_backend_is_refused_with_the_installed_ones(tmp_path: Path) -> None:
    path = config_file(tmp_path / "node.toml", echo_model(), {"name": "x", "backend": "foo"})
    message = load_error(path)
    assert message.startswith(f"{path}: invalid node config:"), message
    assert f"  models.1.backend: unknown backend 'foo'; installed: {BUILT_IN}" in message


def test_a_missing_backend_is_named(tmp_path: Path) -> None:
    message = load_error(config_file(tmp_path / "node.toml", {"name": "x"}))
    assert "  models.0.backend: Field required" in message, message


def test_an_installed_plugin_is_listed_among_the_known(tmp_path: Path, with_plugin: Path) -> None:
    message = load_error(config_file(tmp_path / "node.toml", {"name": "x", "backend": "foo"}))
    assert "installed: echo, litellm, llama_cpp, openai, reverse, swarm" in message, message


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"times": 0}, "models.0.reverse.times: Input should be greater than or equal to 1"),
        ({"times": "twice"}, "models.0.reverse.times: Input should be a valid integer"),
        ({"prefix": 3}, "models.0.reverse.prefix: Input should be a valid string"),
        ({"colour": "red"}, "models.0.reverse.colour: Extra inputs are not permitted"),
        ({"concurrency": 0}, "models.0.reverse.concurrency: Input should be greater than"),
    ],
    ids=["too-few", "not-a-number", "not-a-string", "unknown-key", "common-key"],
)
def test_the_plugin_validates_its_own_keys(
    tmp_path: Path, with_plugin: Path, keys: dict[str, object], expected: str
) -> None:
    message = load_error(config_file(tmp_path / "node.toml", reverse_model(**keys)))
    assert expected in message, message
    assert message.count("\n  ") == 1, message  # that error alone


def test_a_plugin_model_round_trips_through_the_file(tmp_path: Path, with_plugin: Path) -> None:
    path = config_file(tmp_path / "node.toml", reverse_model(times=3), echo_model(delay_ms=5))
    config = load_node_config(path)
    rev = config.models[0]
    assert isinstance(rev, backend_class("reverse").Config)
    assert (rev.prefix, rev.times, rev.separator) == ("<", 3, " ")
    written = tmp_path / "written.toml"
    write_node_config(config, written)
    assert "separator = " in written.read_text()  # defaults are written out
    assert load_node_config(written).models == config.models


def broken_plugins(target: Path) -> Path:
    """Entry points that name no importable backend."""
    target.mkdir(parents=True)
    info = target / "obb_broken-0.1.dist-info"
    info.mkdir()
    info.joinpath("METADATA").write_text("Metadata-Version: 2.1\nName: obb-broken\nVersion: 0.1\n")
    groups = {
        "openbeepboop.backends": {
            "gone": "obb_no_such_module:Backend",
            "plain": "openbeepboop.node.backends.base:last_user_text",
        }
    }
    info.joinpath("entry_points.txt").write_text(entry_points_txt(groups))
    return target


@pytest.mark.parametrize(
    ("backend", "expected"),
    [
        (
            "gone",
            "models.0.backend: backend 'gone' (obb_no_such_module:Backend) failed to load: "
            "ModuleNotFoundError: No module named 'obb_no_such_module'",
        ),
        (
            "plain",
            "models.0.backend: backend 'plain' (openbeepboop.node.backends.base:last_user_text)"
            " is not a backend: it needs a `Config` attribute",
        ),
    ],
)
def test_a_broken_plugin_is_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str, expected: str
) -> None:
    monkeypatch.syspath_prepend(str(broken_plugins(tmp_path / "broken")))
    message = load_error(config_file(tmp_path / "node.toml", {"name": "x", "backend": backend}))
    assert expected in message, message


# -- openbeepboop-node setup -----------------------------------------------------------


def node_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "openbeepboop.cli.node", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def backend_option(help_text: str) -> str:
    [line] = [ln for ln in help_text.splitlines() if ln.strip().startswith("--backend")]
    return line


@pytest.mark.slow
def test_setup_lists_the_backends_that_are_installed(plugin_site: Path) -> None:
    without = node_cli("setup", "--help", env=child_env())
    with_it = node_cli("setup", "--help", env=plugin_env(plugin_site))
    assert without.returncode == with_it.returncode == 0, without.stderr + with_it.stderr
    assert "[echo|litellm|llama_cpp|openai|swarm]" in backend_option(without.stdout)
    assert "[echo|litellm|llama_cpp|openai|reverse|swarm]" in backend_option(with_it.stdout)
    refused = node_cli("setup", "--backend", "reverse", "--no-check", env=child_env())
    assert refused.returncode == 2
    known = "'echo', 'litellm', 'llama_cpp', 'openai', 'swarm'"
    assert f"'reverse' is not one of {known}" in refused.stderr


@pytest.mark.slow
def test_setup_without_a_plugin_key_names_it(tmp_path: Path, plugin_site: Path) -> None:
    config = tmp_path / "node.toml"
    done = node_cli(
        *("setup", "--non-interactive", "--no-check", "--config", str(config)),
        *("--server", "http://127.0.0.1:9", "--api-key", "obb_node_x", "--backend", "reverse"),
        env=plugin_env(plugin_site),
    )
    assert done.returncode == 2, done.stderr
    assert "invalid node config:\n  models.0.reverse.prefix: Field required" in done.stderr
    assert "Traceback" not in done.stderr and not config.exists()


@pytest.mark.slow
def test_the_wizard_asks_for_a_plugin_key_and_writes_its_defaults(
    tmp_path: Path, plugin_site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "node.toml"
    flags = ["--config", str(config), "--server", "http://127.0.0.1:9", "--api-key", "obb_node_x"]
    child = pexpect.spawn(
        sys.executable,
        ["-m", "openbeepboop.cli.node", "setup", *flags, "--name", "n1", "--no-check"],
        env=plugin_env(plugin_site),
        encoding="utf-8",
        timeout=60,
        dimensions=(50, 250),
    )
    try:
        known = "echo, litellm, llama_cpp, openai, reverse, swarm"
        child.expect(rf"Backend \({known}\) \[llama_cpp\]: ")
        child.sendline("reverse")
        child.expect(r"Model name clients will ask for \[reverse\]: ")
        child.sendline("")
        child.expect(r"Text said before each reversed prompt \(prefix\): ")
        child.sendline(">>")
        child.expect(r"Concurrent jobs \[1\]: ")
        child.sendline("2")
        child.expect(r"Add another model\? \[y/N\]: ")
        child.sendline("")
        child.expect(pexpect.EOF)
        output = child.before
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, output
    monkeypatch.syspath_prepend(str(plugin_site))
    try:
        [model] = load_node_config(config).models
    finally:
        sys.modules.pop("obb_reverse", None)
    assert model.model_dump() == {
        **reverse_model(name="reverse", prefix=">>", times=1, separator=" "),
        **{"concurrency": 2, "timeout_seconds": 600.0, "max_attempts": 5},
        **{"rpm": None, "tpm": None, "worker": None, "idle_unload_seconds": None},
    }


# -- end to end ------------------------------------------------------------------------


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    yield p
    p.close()


@pytest.mark.slow
@pytest.mark.filterwarnings(SERVER_LOG_WARNING)
def test_a_plugin_backend_runs_a_job_end_to_end(
    server_process: Callable[..., ServerProcess], procs: Procs, tmp_path: Path, plugin_site: Path
) -> None:
    server = server_process()
    model = reverse_model(times=2, separator=" | ")
    config = write_config(tmp_path / "node" / "node.toml", server, [model])
    node = start_node(procs, config, PYTHONPATH=plugin_path(plugin_site))
    node_id_of(node)
    job = submit_chat(server, "hello", "rev")
    (done,) = wait_jobs(server, [job], {"completed", "failed"}, timeout=30)
    assert done["status"] == "completed", done
    assert answer(done) == "<olleh | <olleh"
    [ready] = log_events(node, "model ready")
    assert "backend=reverse" in ready, ready
