"""What the node's machine has, sent at registration (`GET /v1/nodes` shows it): CPU and
its features, memory, GPUs, and what llama.cpp can offload to.

Each probe is best effort and cheap (a file read, one `nvidia-smi` call with a short
timeout): a probe that fails leaves its field out, it never stops a node.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from openbeepboop.node.backends.base import JSON

# the CPU features that decide llama.cpp's speed (x86 flags, Arm features)
FEATURES = ("sse3", "ssse3", "avx", "avx2", "avx512f", "fma", "f16c", "neon", "asimd", "sve")
NVIDIA_SMI_SECONDS = 3.0


def detect(llama: bool = False) -> JSON:
    """The machine, as a JSON object. With `llama`, also what the installed llama.cpp
    reports (whether it offloads to a GPU, and with what)."""
    info: JSON = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        **_cpu(),
        **_memory(),
    }
    gpus = _nvidia_gpus() or _apple_gpu()
    if gpus:
        info["gpus"] = gpus
    if llama:
        info.update(llama_support())
    return info


def llama_support() -> JSON:
    """`{"llama_gpu_offload": bool, "llama_system": "..."}` from llama-cpp-python, or {}
    when it is not installed."""
    try:
        import llama_cpp
    except Exception:
        return {}
    out: JSON = {}
    with contextlib.suppress(Exception):
        out["llama_gpu_offload"] = bool(llama_cpp.llama_supports_gpu_offload())
    with contextlib.suppress(Exception):
        system = llama_cpp.llama_print_system_info()
        text = system.decode() if isinstance(system, bytes) else str(system)
        out["llama_system"] = text.strip(" |")
    return out


def _cpu() -> JSON:
    text = _read("/proc/cpuinfo")
    if not text:
        return {"cpu": platform.processor() or platform.machine()}
    name = re.search(r"^(?:model name|Hardware|Model)\s*:\s*(.+)$", text, re.MULTILINE)
    flags = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.MULTILINE)
    have = set(flags.group(1).split()) if flags else set()
    if "pni" in have:  # Linux's name for SSE3
        have.add("sse3")
    out: JSON = {"cpu": name.group(1).strip() if name else platform.machine()}
    out["cpu_features"] = [f for f in FEATURES if f in have]
    return out


def _memory() -> JSON:
    out: JSON = {}
    with contextlib.suppress(ValueError, OSError, AttributeError):
        out["ram_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    available = re.search(r"^MemAvailable:\s*(\d+) kB", _read("/proc/meminfo"), re.MULTILINE)
    if available:
        out["ram_available_bytes"] = int(available.group(1)) * 1024
    return out


def _nvidia_gpus() -> list[JSON]:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        done = subprocess.run(
            [smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_SECONDS,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in done.stdout.splitlines():
        name, _, mib = line.rpartition(",")
        if name.strip() and mib.strip().isdigit():
            gpus.append(
                {"name": name.strip(), "kind": "cuda", "memory_bytes": int(mib) * 1024 * 1024}
            )
    return gpus


def _apple_gpu() -> list[JSON]:
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return [{"name": "Apple silicon GPU", "kind": "metal"}]  # memory is the RAM's
    return []


def _read(path: str) -> Any:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""
