"""Runs `pull_model` in a process of its own (so that HF_ENDPOINT is read fresh, and a
test can run two at once) and prints every progress call and the outcome as JSON lines:
{"progress": [done, total]}, then {"entry": {...}} or {"error": "..."} (exit 1)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from openbeepboop.node.models import ModelCache, PullError, pull_model


def main() -> int:
    spec, cache_dir = sys.argv[1], Path(sys.argv[2])

    def progress(done: int, total: int | None) -> None:
        print(json.dumps({"progress": [done, total]}), flush=True)

    def waiting() -> None:
        print(json.dumps({"waiting": True}), flush=True)

    try:
        entry = pull_model(spec, ModelCache(cache_dir), progress=progress, on_wait=waiting)
    except PullError as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        return 1
    print(json.dumps({"entry": entry.to_json()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
