"""`python -m tests.chaos.health_poller PORT`: GET /health every 20 ms, printing each latency in seconds on a
line of its own, until terminated. A process of its own, so a test's own load generator (in the test's
interpreter) cannot delay the probes."""

from __future__ import annotations

import http.client
import sys
import time


def main(port: int) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while True:
        started = time.monotonic()
        connection.request("GET", "/health")
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise SystemExit(f"/health answered {response.status}")
        print(f"{time.monotonic() - started:.6f}", flush=True)
        time.sleep(0.02)


if __name__ == "__main__":
    main(int(sys.argv[1]))
