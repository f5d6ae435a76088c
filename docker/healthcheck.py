"""The image's HEALTHCHECK: healthy when the server in this container answers /health.

Standard library only, so it costs a Python start and one local request; the port is
the server's own setting (OPENBEEPBOOP_PORT)."""

import os
import sys
import urllib.request


def main() -> int:
    port = os.environ.get("OPENBEEPBOOP_PORT", "8000")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=4) as answer:
            return 0 if answer.status == 200 else 1
    except OSError as exc:
        print(f"no answer from /health on port {port}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
