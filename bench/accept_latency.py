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

from common import bearer, broker_process, load, summary


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
