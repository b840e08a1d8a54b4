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
import time

import httpx
from common import bearer, broker_process, summary


async def load(
    base: str,
    method: str,
    path: str,
    total: int,
    concurrency: int,
    make_body: object | None,
    headers: dict[str, str],
) -> tuple[list[float], float]:
    latencies: list[float] = []
    counter = iter(range(total))
    failures = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=base, headers=headers, limits=limits, timeout=60
    ) as client:

        async def caller() -> None:
            nonlocal failures
            for n in counter:
                body = make_body(n) if callable(make_body) else None
                started = time.perf_counter()
                response = await client.request(method, path, json=body)
                latencies.append(time.perf_counter() - started)
                if response.status_code >= 400:
                    failures += 1

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
    args = parser.parse_args()
    headers = bearer(["*"])
    with broker_process(KIDP_RATE_LIMIT_PER_MINUTE="100000000") as base:
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
