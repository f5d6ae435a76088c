"""A file server for the model-pull tests, run as a process: it serves the files in
`--dir` at `/files/NAME` with `Range` support, and mimics the hub's `resolve` URLs:
`HEAD /ORG/REPO/resolve/REV/NAME` answers 302 to a CDN address on another host name
(`localhost` for a hub at 127.0.0.1) with the headers huggingface_hub reads (X-Repo-Commit,
X-Linked-Etag = the sha256, X-Linked-Size), as the real hub does for LFS files.

    --throttle BYTES_PER_S   send slowly (so a test can kill it mid-transfer)
    --no-range               answer 200 with the whole file even when asked for a range
    --corrupt                serve bytes that differ from the file (the hub's sha256 is right)

Every request is one JSON line on stdout: {"method", "path", "range"}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

CHUNK = 64 * 1024
RESOLVE = re.compile(r"^/([^/]+)/([^/]+)/resolve/([^/]+)/(.+)$")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def do_HEAD(self) -> None:
        self._route(body=False)

    def do_GET(self) -> None:
        self._route(body=True)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _route(self, body: bool) -> None:
        rng = self.headers.get("Range")
        print(json.dumps({"method": self.command, "path": self.path, "range": rng}), flush=True)
        if self.path == "/health":
            return self._empty(200)
        if match := RESOLVE.match(self.path):
            return self._resolve(match.group(4))
        for prefix in ("/files/", "/cdn/"):
            if self.path.startswith(prefix):
                return self._file(self.path.removeprefix(prefix), rng, body)
        return self._empty(404)

    def _resolve(self, name: str) -> None:
        path = self.server.root / name
        if not path.is_file():
            return self._empty(404, {"X-Error-Code": "EntryNotFound"})
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        port = self.server.server_address[1]
        self._empty(
            302,
            {
                "Location": f"http://localhost:{port}/cdn/{name}",
                "X-Repo-Commit": "c" * 40,
                "X-Linked-Etag": f'"{sha}"',
                "X-Linked-Size": str(path.stat().st_size),
                "ETag": '"' + "e" * 40 + '"',
            },
        )

    def _file(self, name: str, rng: str | None, body: bool) -> None:
        path = self.server.root / name
        if not path.is_file():
            return self._empty(404)
        data = path.read_bytes()
        if self.server.corrupt:
            data = bytes(b ^ 0xFF if i % 4096 == 0 else b for i, b in enumerate(data))
        start = 0
        if rng and not self.server.no_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))  # type: ignore[union-attr]
            if start >= len(data):
                return self._empty(416, {"Content-Range": f"bytes */{len(data)}"})
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if body:
            self._send(data[start:])

    def _send(self, data: bytes) -> None:
        rate = self.server.throttle
        for i in range(0, len(data), CHUNK):
            self.wfile.write(data[i : i + CHUNK])
            self.wfile.flush()
            if rate:
                time.sleep(CHUNK / rate)

    def _empty(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", "0")
        self.end_headers()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--throttle", type=float, default=0)
    parser.add_argument("--no-range", action="store_true")
    parser.add_argument("--corrupt", action="store_true")
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.root = args.dir  # type: ignore[attr-defined]
    server.throttle = args.throttle  # type: ignore[attr-defined]
    server.no_range = args.no_range  # type: ignore[attr-defined]
    server.corrupt = args.corrupt  # type: ignore[attr-defined]
    print(json.dumps({"listening": args.port}), file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
