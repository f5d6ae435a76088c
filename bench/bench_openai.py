#!/usr/bin/env python3
"""Added latency of one synchronous OpenAI chat completion: direct, through OpenBeepBoop,
and through LiteLLM's proxy, in one run, against the same mock backend.

Every path answers the same request (``model``, one user message of ``--words`` words,
which the mock ``tests/mock_openai.py`` echoes back with zero delay), one request at a
time, with the ``openai`` SDK as the client (``max_retries=0``, keep-alive):

- ``direct``: the SDK calls the mock itself;
- ``obb``: a real ``openbeepboop-server start`` process (durable default: SQLite WAL,
  ``synchronous=FULL``) and one ``openbeepboop-node run`` process whose model uses the
  ``openai`` backend (OpenAI-compatible HTTP, no LiteLLM) pointed at the mock; the SDK
  calls ``POST /v1/chat/completions`` synchronously (no ``Prefer: respond-async``) with
  a client key;
- ``obb-litellm``: the same server and node, a model on the ``litellm`` backend pointed
  at the same mock (the LiteLLM library in the node, as in the proxy);
- ``litellm``: LiteLLM's own proxy (``python -m litellm.proxy.proxy_cli --config ...``,
  one worker, a master key) in front of the same mock;
Where OpenBeepBoop's time goes (``--no-breakdown`` skips these):

- ``obb-echo``: the same server and node, model ``echo`` (the built-in backend, no
  upstream call): the queue round-trip alone;
- in a helper process, timed inside it against the mock: ``sdk-async``
  (``openai.AsyncOpenAI``, what LiteLLM calls underneath), ``litellm-lib`` (one
  ``litellm.acompletion``, not streamed, as the proxy makes for a request that does not
  stream) and ``node-backend`` (``LiteLLMBackend.execute``, exactly what a node on the
  ``litellm`` backend runs for a synchronous call: one plain ``litellm.acompletion``).
  The LiteLLM library's share of ``obb-litellm``'s added time is node-backend -
  sdk-async;
- for TTFT, ``obb-echo-paced``: model ``echo-paced``, whose words come one every 5 ms
  as tokens of a real model do, so that the node's batching of token deltas shows
  (with the mock everything arrives at once).

Rounds alternate the paths (``--round-size`` requests of each, in turn) so that machine
noise hits all; every path is warmed up first. The figures are p50/p90/p99 per path and
the added p50 (path minus direct) of OpenBeepBoop and LiteLLM, and their ratio. Targets:
OpenBeepBoop's added p50 <= 5 ms and below LiteLLM's. The same is done for streaming
(``stream=True``): time to first token (TTFT, until the first chunk with content);
target: OpenBeepBoop's TTFT added <= 10 ms. The machine's load and CPU pressure (PSI)
during the run are printed too: on a small shared machine they explain most surprises.

LiteLLM's proxy needs ``litellm[proxy]==1.100.5`` (the ``bench`` extra), whose
dependencies would downgrade some of the project venv's (rich, websockets), so it runs
from its own venv; make it once::

    python3 -m venv ~/.cache/openbeepboop/litellm-proxy
    ~/.cache/openbeepboop/litellm-proxy/bin/pip install 'litellm[proxy]==1.100.5'

Run::

    .venv/bin/python bench/bench_openai.py                 # about 2 minutes
    .venv/bin/python bench/bench_openai.py --requests 500 --json-out out.json
    .venv/bin/python bench/bench_openai.py --proxy-python /other/venv/bin/python
    .venv/bin/python bench/bench_openai.py --no-proxy      # without LiteLLM's proxy

It prints a markdown table and exits 1 if a target is missed. Every process it starts
(mock, server, node, proxy, helper) is stopped at the end, also on Ctrl-C or an error;
their logs are in a temporary directory (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
MOCK_SCRIPT = ROOT / "tests" / "mock_openai.py"
DEFAULT_PROXY_VENV = Path.home() / ".cache" / "openbeepboop" / "litellm-proxy"
PROVIDER_KEY = "sk-mock-provider-key"
PROXY_KEY = "sk-bench-proxy-master-key"
MODEL = "mock-gpt"  # the node's `openai` backend
LITELLM_MODEL = "mock-gpt-litellm"  # the node's `litellm` backend
UPSTREAM = "openai/mock-upstream"
PACED_MS = 5.0  # echo-paced: one word every PACED_MS, the first one too
TARGET_ADDED_MS = 5.0
TARGET_TTFT_ADDED_MS = 10.0

# -- processes ---------------------------------------------------------------------------


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM if this process dies without cleaning up (SIGKILL)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENBEEPBOOP_")}
    env.update(
        LITELLM_LOCAL_MODEL_COST_MAP="True",  # offline: no fetch of the remote price map
        LITELLM_TELEMETRY="False",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


class Procs:
    """Every process the benchmark starts; `close` stops them all (SIGTERM, then SIGKILL)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.items: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]] = []

    def start(
        self, name: str, argv: list[str], env: dict[str, str], stdin: int | None = None
    ) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=subprocess.PIPE if stdin is not None else log,
            stderr=log,
            env=env,
            cwd=ROOT,
            start_new_session=True,  # Ctrl-C reaches us only; we stop them in order
            preexec_fn=_die_with_parent,
        )
        self.items.append((name, proc, log))
        return proc

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        for _, proc, _ in reversed(self.items):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _, proc, log in self.items:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            log.close()
        self.items.clear()


def wait_ready(
    procs: Procs, name: str, proc: subprocess.Popen[bytes], check: Callable[[], bool], hint: str
) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited ({proc.returncode}):\n{procs.log_tail(name)}{hint}")
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.1)
    raise SystemExit(f"{name} did not come up in 120 s:\n{procs.log_tail(name)}{hint}")


def _get_ok(url: str, **kw: Any) -> bool:
    import httpx

    return httpx.get(url, timeout=2, **kw).status_code == 200


# -- the rig -----------------------------------------------------------------------------


@dataclass
class Rig:
    mock_url: str
    obb_url: str = ""
    client_key: str = ""
    proxy_url: str = ""
    helper: subprocess.Popen[bytes] | None = None


def start_mock(procs: Procs) -> str:
    port = _port()
    argv = [sys.executable, str(MOCK_SCRIPT), "--port", str(port)]
    proc = procs.start("mock", argv, child_env())
    url = f"http://127.0.0.1:{port}"
    wait_ready(procs, "mock", proc, lambda: _get_ok(url + "/health"), "")
    return url


def start_obb(procs: Procs, root: Path, mock_url: str) -> tuple[str, str]:
    """A server and one node serving MODEL (openai -> mock), LITELLM_MODEL (litellm ->
    mock), `echo` and `echo-paced`."""
    import httpx
    import tomli_w

    data = root / "server"
    cli = [sys.executable, "-m", "openbeepboop.cli.server"]
    out = subprocess.run(
        [*cli, "setup", "--non-interactive", "--data-dir", str(data), "--json"],
        capture_output=True,
        check=True,
        text=True,
        env=child_env(),
    )
    keys = json.loads(out.stdout)
    port = _port()
    url = f"http://127.0.0.1:{port}"
    argv = [*cli, "start", "--data-dir", str(data), "--port", str(port)]
    server = procs.start("server", argv, child_env(OPENBEEPBOOP_RATE_LIMIT=""))
    wait_ready(procs, "server", server, lambda: _get_ok(url + "/health"), "")
    config = {
        "server": {"url": url, "api_key": keys["node_key"]},
        "node": {"name": "bench-node", "state_dir": str(root / "node-state")},
        "models": [
            {
                "name": MODEL,
                "backend": "openai",
                "model": UPSTREAM.removeprefix("openai/"),
                "api_base": mock_url + "/v1",
                "api_key": PROVIDER_KEY,
                "concurrency": 4,
            },
            {
                "name": LITELLM_MODEL,
                "backend": "litellm",
                "model": UPSTREAM,
                "api_base": mock_url + "/v1",
                "api_key": PROVIDER_KEY,
                "concurrency": 4,
            },
            {"name": "echo", "backend": "echo", "concurrency": 4},
            {
                "name": "echo-paced",
                "backend": "echo",
                "token_delay_ms": PACED_MS,
                "concurrency": 4,
            },
        ],
    }
    path = root / "node.toml"
    path.write_text(tomli_w.dumps(config))
    argv = [sys.executable, "-m", "openbeepboop.cli.node", "run", "--config", str(path)]
    node = procs.start("node", argv, child_env())
    headers = {"Authorization": f"Bearer {keys['client_key']}"}

    def served() -> bool:
        models = httpx.get(url + "/v1/models", headers=headers, timeout=2).json()["data"]
        names = {m["id"] for m in models if m.get("nodes", 1)}
        return {MODEL, LITELLM_MODEL, "echo", "echo-paced"} <= names

    wait_ready(procs, "node", node, served, "")
    return url, str(keys["client_key"])


def start_proxy(procs: Procs, root: Path, mock_url: str, python: str) -> str:
    port = _port()
    config = {  # YAML is a superset of JSON
        "model_list": [
            {
                "model_name": MODEL,
                "litellm_params": {
                    "model": UPSTREAM,
                    "api_base": mock_url + "/v1",
                    "api_key": PROVIDER_KEY,
                },
            }
        ],
        "general_settings": {"master_key": PROXY_KEY},
    }
    path = root / "proxy.yaml"
    path.write_text(json.dumps(config, indent=2))
    argv = [python, "-m", "litellm.proxy.proxy_cli", "--config", str(path)]
    proc = procs.start("proxy", [*argv, "--host", "127.0.0.1", "--port", str(port)], child_env())
    url = f"http://127.0.0.1:{port}"
    hint = (
        f"\n\nLiteLLM's proxy did not start with {python}. It needs "
        "`litellm[proxy]==1.100.5` in its own venv:\n"
        f"  python3 -m venv {DEFAULT_PROXY_VENV}\n"
        f"  {DEFAULT_PROXY_VENV}/bin/pip install 'litellm[proxy]==1.100.5'\n"
        "then run again (or pass --proxy-python PATH, or --no-proxy)."
    )
    wait_ready(procs, "proxy", proc, lambda: _get_ok(url + "/health/liveliness"), hint)
    return url


def start_helper(procs: Procs, mock_url: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--helper", mock_url]
    proc = procs.start("helper", argv, child_env(), stdin=subprocess.PIPE)
    _ask(proc, "ping")
    return proc


def _ask(proc: subprocess.Popen[bytes], command: str) -> float:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(command.encode() + b"\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError("the helper process exited")
    return float(line)


# -- the helper: the node's LiteLLM backend, in a process of its own ---------------------


def helper_main(mock_url: str) -> None:
    """Read commands on stdin: `request JSON` sets the request; `stream` runs the node's
    LiteLLM backend once (what the node does per job), `plain` one non-streamed
    `litellm.acompletion`, `openai` one call of the `openai` async client; each answers
    the seconds it took, measured here."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import openai

    from openbeepboop.node.backends.litellm import LiteLLMBackend, LiteLLMModel

    config = LiteLLMModel(
        name=MODEL,
        backend="litellm",
        model=UPSTREAM,
        api_base=mock_url + "/v1",
        api_key=PROVIDER_KEY,
    )
    backend = LiteLLMBackend(config)
    runner = asyncio.Runner()
    runner.run(backend.load(lambda state, fraction: None))
    litellm = backend._litellm
    request: dict[str, Any] = {}

    async def stream() -> None:
        last = None
        async for chunk in backend.execute("/v1/chat/completions", request):
            last = chunk
        assert last is not None and last.response is not None

    async def plain() -> None:
        r = await litellm.acompletion(messages=request["messages"], **backend._kwargs(request))
        assert r.choices[0].message.content

    sdk = openai.AsyncOpenAI(base_url=mock_url + "/v1", api_key=PROVIDER_KEY, max_retries=0)

    async def direct() -> None:
        r = await sdk.chat.completions.create(model=MODEL, messages=request["messages"])
        assert r.choices[0].message.content

    commands = {"stream": stream, "plain": plain, "openai": direct}

    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "request":
            request = json.loads(arg)
            elapsed = 0.0
        elif command in commands:
            start = time.perf_counter()
            runner.run(commands[command]())
            elapsed = time.perf_counter() - start
        else:
            elapsed = 0.0
        sys.stdout.write(f"{elapsed!r}\n")
        sys.stdout.flush()
    runner.close()


# -- paths -------------------------------------------------------------------------------


@dataclass
class Path_:
    name: str
    what: str
    once: Callable[[], float]
    offset_ms: float = 0.0  # subtracted from its added p50 (time the model itself takes)
    samples: list[float] = field(default_factory=list)


def _messages(words: int) -> list[dict[str, str]]:
    text = " ".join(f"word{i}" for i in range(words))
    return [{"role": "user", "content": text}]


def sync_call(client: Any, model: str, messages: list[dict[str, str]]) -> Callable[[], float]:
    expected = messages[-1]["content"]

    def once() -> float:
        start = time.perf_counter()
        r = client.chat.completions.create(model=model, messages=messages)
        elapsed = time.perf_counter() - start
        if r.choices[0].message.content != expected:
            raise RuntimeError(f"{client.base_url}: unexpected answer {r.choices[0].message}")
        return elapsed

    return once


def ttft_call(client: Any, model: str, messages: list[dict[str, str]]) -> Callable[[], float]:
    expected = messages[-1]["content"]

    def once() -> float:
        start = time.perf_counter()
        first = None
        text = []
        stream = client.chat.completions.create(model=model, messages=messages, stream=True)
        with stream:
            for chunk in stream:
                content = chunk.choices[0].delta.content if chunk.choices else None
                if content:
                    if first is None:
                        first = time.perf_counter() - start
                    text.append(content)
        if first is None or "".join(text) != expected:
            raise RuntimeError(f"{client.base_url}: unexpected stream {''.join(text)!r}")
        return first

    return once


def helper_call(helper: subprocess.Popen[bytes], command: str) -> Callable[[], float]:
    return lambda: _ask(helper, command)


def build_paths(rig: Rig, words: int, stream: bool, breakdown: bool) -> list[Path_]:
    import openai

    messages = _messages(words)
    kw: dict[str, Any] = {"max_retries": 0, "timeout": 60}
    direct = openai.OpenAI(base_url=rig.mock_url + "/v1", api_key=PROVIDER_KEY, **kw)
    obb = openai.OpenAI(base_url=rig.obb_url + "/v1", api_key=rig.client_key, **kw)
    call = ttft_call if stream else sync_call
    paths = [
        Path_("direct", "openai SDK -> mock", call(direct, MODEL, messages)),
        Path_("obb", "OpenBeepBoop: server + node (openai backend)", call(obb, MODEL, messages)),
        Path_(
            "obb-litellm",
            "OpenBeepBoop: server + node (litellm backend)",
            call(obb, LITELLM_MODEL, messages),
        ),
    ]
    if rig.proxy_url:
        proxy = openai.OpenAI(base_url=rig.proxy_url + "/v1", api_key=PROXY_KEY, **kw)
        paths.append(Path_("litellm", "LiteLLM proxy", call(proxy, MODEL, messages)))
    if not breakdown:
        return paths
    what = "OpenBeepBoop: server + node, model `echo` (no upstream call)"
    paths.append(Path_("obb-echo", what, call(obb, "echo", messages)))
    if stream:
        what = (
            f"the same, model `echo-paced`: a word every {PACED_MS:g} ms, as tokens "
            f"trickle in (added: minus the first word's {PACED_MS:g} ms)"
        )
        once = call(obb, "echo-paced", messages)
        paths.append(Path_("obb-echo-paced", what, once, offset_ms=PACED_MS))
    if rig.helper is not None and not stream:
        body = {"model": MODEL, "messages": messages, "stream": False}  # as sync calls send
        _ask(rig.helper, "request " + json.dumps(body))
        for name, command, what in (
            ("sdk-async", "openai", "in the helper: `openai.AsyncOpenAI` -> mock"),
            ("litellm-lib", "plain", "in the helper: `litellm.acompletion` -> mock"),
            (
                "node-backend",
                "stream",
                "in the helper: the node's litellm backend, as for a sync call",
            ),
        ):
            paths.append(Path_(name, what, helper_call(rig.helper, command)))
    return paths


def run_rounds(paths: list[Path_], requests: int, round_size: int, warmup: int) -> None:
    for path in paths:
        for _ in range(warmup):
            path.once()
    done = 0
    while done < requests:
        n = min(round_size, requests - done)
        for path in paths:
            path.samples.extend(path.once() for _ in range(n))
        done += n


# -- figures -----------------------------------------------------------------------------


def pct(samples: list[float], p: float) -> float:
    """Nearest-rank percentile, in milliseconds."""
    ordered = sorted(samples)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k] * 1000


def summary(paths: list[Path_]) -> dict[str, dict[str, float]]:
    base = statistics.median(paths[0].samples) * 1000
    out = {}
    for path in paths:
        p50 = statistics.median(path.samples) * 1000
        out[path.name] = {
            "n": len(path.samples),
            "p50_ms": round(p50, 3),
            "p90_ms": round(pct(path.samples, 90), 3),
            "p99_ms": round(pct(path.samples, 99), 3),
            "added_p50_ms": round(p50 - base - path.offset_ms, 3),
        }
    return out


def table(title: str, paths: list[Path_], figures: dict[str, dict[str, float]]) -> str:
    rows = [
        f"**{title}**",
        "",
        "| path | what | p50 ms | p90 ms | p99 ms | added p50 ms (vs direct) |",
        "|---|---|---|---|---|---|",
    ]
    for path in paths:
        f = figures[path.name]
        added = "—" if path.name == "direct" else f"{f['added_p50_ms']:+.2f}"
        rows.append(
            f"| {path.name} | {path.what} | {f['p50_ms']:.2f} | {f['p90_ms']:.2f} "
            f"| {f['p99_ms']:.2f} | {added} |"
        )
    return "\n".join(rows)


def ms(figures: dict[str, Any], path: str) -> float:
    return float(figures[path]["added_p50_ms"])


def verdicts(sync: dict[str, Any], ttft: dict[str, Any] | None) -> tuple[list[str], bool]:
    """Target checks and the breakdown, as markdown lines; and whether all targets are met."""
    lines, ok = [], True

    def check(what: str, value: float, met: bool, target: str) -> None:
        nonlocal ok
        ok &= met
        lines.append(f"- {what}: **{value:.2f} ms** ({target}): " + ("met" if met else "MISSED"))

    obb = ms(sync, "obb")
    check(
        "OpenBeepBoop added p50", obb, obb <= TARGET_ADDED_MS, f"target <= {TARGET_ADDED_MS:g} ms"
    )
    if "litellm" in sync:
        lite = ms(sync, "litellm")
        ratio = obb / lite if lite > 0 else float("nan")
        check(
            "LiteLLM proxy added p50",
            lite,
            obb < lite,
            f"OpenBeepBoop / LiteLLM = {ratio:.2f}; target: OpenBeepBoop below LiteLLM",
        )
    if ttft is not None:
        t = ms(ttft, "obb")
        target = f"target <= {TARGET_TTFT_ADDED_MS:g} ms"
        check("OpenBeepBoop TTFT added p50", t, t <= TARGET_TTFT_ADDED_MS, target)
        if "litellm" in ttft:
            lite = ms(ttft, "litellm")
            lines.append(f"- LiteLLM proxy TTFT added p50: **{lite:.2f} ms**")
    for figures, what in ((sync, "added p50"), (ttft or {}, "TTFT added p50")):
        if {"obb-litellm", "litellm"} <= set(figures):
            mine, lite = ms(figures, "obb-litellm"), ms(figures, "litellm")
            lines.append(
                f"- with the LiteLLM library on both sides (node `litellm` backend vs "
                f"LiteLLM's proxy), {what}: {mine:.2f} vs {lite:.2f} ms "
                f"(ratio {mine / lite if lite > 0 else float('nan'):.2f})"
            )
    if {"obb-echo", "sdk-async", "node-backend", "litellm-lib"} <= set(sync):
        queue = ms(sync, "obb-echo")
        library = ms(sync, "node-backend") - ms(sync, "sdk-async")
        lines.append(
            f"- where the time goes: the queue round-trip (obb-echo - direct) {queue:.2f} ms; "
            f"the LiteLLM library, when a node uses it (node-backend - sdk-async), "
            f"{library:.2f} ms"
        )
    return lines, ok


# -- main --------------------------------------------------------------------------------


def default_proxy_python() -> str:
    env = os.environ.get("OBB_BENCH_PROXY_PYTHON")
    if env:
        return env
    venv = DEFAULT_PROXY_VENV / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def _loadavg() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "?"


def _cpu_pressure_us() -> int | None:
    """PSI: total microseconds during which some runnable task waited for a CPU."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return int(line.rsplit("total=", 1)[1])
    return None


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGINT (even where a shell started us with SIGINT ignored) raise
    KeyboardInterrupt, so that the `finally` that stops the processes runs."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="measured requests per path")
    parser.add_argument("--warmup", type=int, default=20, help="warm-up requests per path")
    parser.add_argument("--round-size", type=int, default=10, help="requests per path per turn")
    parser.add_argument("--words", type=int, default=16, help="words in the prompt and answer")
    parser.add_argument("--proxy-python", default=default_proxy_python())
    parser.add_argument("--no-proxy", action="store_true", help="skip LiteLLM's proxy")
    parser.add_argument("--no-breakdown", action="store_true", help="skip obb-echo, helper")
    parser.add_argument("--no-stream", action="store_true", help="skip the TTFT part")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--helper", metavar="MOCK_URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.helper:
        helper_main(args.helper)
        return 0

    root = Path(tempfile.mkdtemp(prefix="bench-openai-"))
    procs = Procs(root)
    out: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "command": " ".join(["bench/bench_openai.py", *sys.argv[1:]]),
        "cpus": os.cpu_count(),
        "requests": args.requests,
        "warmup": args.warmup,
        "words": args.words,
    }
    tables = []
    try:
        with signals_interrupt():
            print(f"starting mock, server, node, proxy (logs in {root}) ...", file=sys.stderr)
            rig = Rig(start_mock(procs))
            rig.obb_url, rig.client_key = start_obb(procs, root, rig.mock_url)
            if not args.no_proxy:
                rig.proxy_url = start_proxy(procs, root, rig.mock_url, args.proxy_python)
            if not args.no_breakdown:
                rig.helper = start_helper(procs, rig.mock_url)
            sections = [("sync", "Synchronous chat completion: latency", False)]
            if not args.no_stream:
                sections.append(("ttft", "Streaming (stream=True): time to first token", True))
            load, pressure, started = _loadavg(), _cpu_pressure_us(), time.monotonic()
            for key, title, stream in sections:
                paths = build_paths(rig, args.words, stream, not args.no_breakdown)
                print(f"{key}: {', '.join(p.name for p in paths)} ...", file=sys.stderr)
                run_rounds(paths, args.requests, args.round_size, args.warmup)
                out[key] = summary(paths)
                tables.append(table(title, paths, out[key]))
            seconds = time.monotonic() - started
            out["load"] = f"{load} -> {_loadavg()}"
            after = _cpu_pressure_us()
            if pressure is not None and after is not None:
                out["cpu_pressure_pct"] = round((after - pressure) / 1e6 / seconds * 100, 1)
    except KeyboardInterrupt:
        print("interrupted; stopping every process started", file=sys.stderr)
        return 130
    finally:
        procs.close()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    pressure_note = (
        f", CPU pressure {out['cpu_pressure_pct']} % (PSI: time some task waited for a CPU)"
        if "cpu_pressure_pct" in out
        else ""
    )
    print(
        f"\n{out['date']}: `{out['command']}`; {out['cpus']} CPUs, load {out['load']}"
        f"{pressure_note}; {args.requests} requests per path after {args.warmup} warm-up, "
        f"{args.words}-word answers\n"
    )
    print("\n\n".join(tables))
    lines, ok = verdicts(out["sync"], out.get("ttft"))
    out["targets_met"] = ok
    print("\n" + "\n".join(lines))
    if args.json_out:
        args.json_out.write_text(json.dumps(out, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
