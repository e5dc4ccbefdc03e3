#!/usr/bin/env python3
"""Container health check: exit 0 when glm-serve's GET /health answers 200, else 1.

/health is 503 while the engine loads, while it drains after SIGTERM, and when it has failed. The port
is the one the server listens on in the images: GLM_SERVE_SERVER__PORT (8000 by default)."""

import os
import sys
import urllib.error
import urllib.request

HEALTH_PATH = "/health"


def main() -> int:
    port = os.environ.get("GLM_SERVE_SERVER__PORT", "8000")
    url = f"http://127.0.0.1:{port}{HEALTH_PATH}"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"glm-serve health check: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
