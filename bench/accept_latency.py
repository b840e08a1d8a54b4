"""Accept latency of POST /v1/provision at 100 concurrent callers on loopback,
next to the same server's GET /health at the same load.

    .venv/bin/python bench/accept_latency.py [--requests 2000] [--concurrency 100]

The server is `kidp-broker serve --emulate` (API, 4 workers and timers in one
process, SQLite store and queue) in a child process; the load generator is
asyncio + httpx in this process, on the same 2 cores. The rate limit is raised
for the run so the numbers measure the broker, not the limiter's refusals.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable

from common import bearer, broker_process, summary


async def load(
    base: str,
    method: str,
    path: str,
    total: int,
    concurrency: int,
    make_body: Callable[[int], dict[str, object]] | None,
    headers: dict[str, str],
) -> tuple[list[float], float]:
    """``total`` requests over ``concurrency`` keep-alive connections.

    A minimal HTTP/1.1 client on asyncio streams: httpx's async pool tops out
    near 200 requests/s on this machine even against a do-nothing server, so
    it would measure itself rather than the broker.
    """
    host, port = base.removeprefix("http://").split(":")
    latencies: list[float] = []
    counter = iter(range(total))
    failures = 0

    async def caller() -> None:
        nonlocal failures
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for n in counter:
                body = json.dumps(make_body(n)).encode() if make_body else b""
                head = [
                    f"{method} {path} HTTP/1.1",
                    f"Host: {host}:{port}",
                    f"Content-Length: {len(body)}",
                    "Content-Type: application/json",
                    *(f"{k}: {v}" for k, v in headers.items()),
                ]
                started = time.perf_counter()
                writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
                await writer.drain()
                status_line = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - started)
                if int(status_line.split()[1]) >= 400:
                    failures += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    if failures:
        print(f"  ({failures} responses were errors)")
    return latencies, wall


def provision_body(n: int) -> dict[str, object]:
    return {
        "resourceType": "bucket",
        "resourceName": f"bench-{n}",
        "namespace": f"bench-{n % 20}",
        "team": "bench",
        "owner": "bench@example.com",
        "spec": {"versioning": False},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument(
        "--role",
        default="all",
        choices=["all", "api"],
        help="all: workers provision what is accepted, in the same process; "
        "api: the accept path alone",
    )
    args = parser.parse_args()
    headers = bearer(["*"])
    with broker_process(args.role, KIDP_RATE_LIMIT_PER_MINUTE="100000000") as base:
        # Warm up connections and caches before measuring.
        asyncio.run(load(base, "GET", "/health", 200, args.concurrency, None, headers))
        health, health_wall = asyncio.run(
            load(base, "GET", "/health", args.requests, args.concurrency, None, headers)
        )
        accept, accept_wall = asyncio.run(
            load(
                base,
                "POST",
                "/v1/provision",
                args.requests,
                args.concurrency,
                provision_body,
                headers,
            )
        )
    print(
        f"accept latency, {args.concurrency} concurrent callers, loopback, 2 cores shared "
        "with the load generator"
    )
    print(summary("GET /health", health, health_wall))
    print(summary("POST /v1/provision (202)", accept, accept_wall))


if __name__ == "__main__":
    main()
