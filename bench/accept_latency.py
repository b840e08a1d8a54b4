"""Accept latency of POST /v1/provision at 100 concurrent callers on loopback,
next to the same server's GET /health at the same load.

    .venv/bin/python bench/accept_latency.py [--requests 3000] [--concurrency 100]
                                             [--kind database|bucket] [--role all|api]

The server is `kidp-broker serve --emulate` in a child process: the API in
that process, the workers (provisioning what is accepted, with callbacks to a
receiver here) and the emulated AWS in processes of their own, on the SQLite
store. The load generator is asyncio in this process, on the same 2 cores.
Three measurements, in this order:

1. burst: CONCURRENCY callers each POST one provision at the same moment
   (what a platform does when a team's stack is applied);
2. sustained GET /health: REQUESTS requests over CONCURRENCY keep-alive callers;
3. sustained POST /v1/provision: the same load.

The rate limit is raised for the run so the numbers measure the broker.
"""

from __future__ import annotations

import argparse
import asyncio
from collections import Counter

from common import bearer, broker_process, burst, load, summary

from kidp.callbacks import generate_secret
from kidp.receiver import CallbackReceiver


def main() -> None:
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument(
        "--kind",
        default="database",
        choices=["database", "bucket"],
        help="database: PostgreSQL 15 medium with a callbackUrl; bucket: an S3 bucket, no callback",
    )
    parser.add_argument(
        "--role",
        default="all",
        choices=["all", "api"],
        help="all: workers provision what is accepted; api: the accept path alone",
    )
    args = parser.parse_args()
    secret = generate_secret()
    receiver = CallbackReceiver(secret)

    def provision(n: int, prefix: str) -> dict[str, object]:
        body: dict[str, object] = {
            "resourceName": f"{prefix}-{n}",
            "namespace": f"bench-{n % 20}",
            "team": "bench",
            "owner": "bench@example.com",
        }
        if args.kind == "database":
            body["resourceType"] = "database"
            body["callbackUrl"] = receiver.url
            body["spec"] = {"engine": "postgresql", "version": "15", "size": "medium"}
        else:
            body["resourceType"] = "bucket"
            body["spec"] = {"versioning": False}
        return body

    headers = bearer(["*"])
    env = {
        "KIDP_RATE_LIMIT_PER_MINUTE": "100000000",
        "KIDP_CALLBACK_SECRET": secret,
        "KIDP_CALLBACK_ALLOWLIST": "127.0.0.1",
        "KIDP_NAMESPACE_CONCURRENCY": "1000",
    }
    with broker_process(args.role, **env) as base:
        # Warm up connections, caches and the quota figures before measuring.
        asyncio.run(load(base, "GET", "/health", 200, args.concurrency, None, headers))
        asyncio.run(
            load(base, "POST", "/v1/provision", 20, 10, lambda n: provision(n, "warm"), headers)
        )
        burst_latencies, burst_wall, statuses = asyncio.run(
            burst(
                base,
                "/v1/provision",
                args.concurrency,
                lambda n: provision(n, "burst"),
                headers,
            )
        )
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
                lambda n: provision(n, "load"),
                headers,
            )
        )
    receiver.close()
    kind = "database (PostgreSQL 15, medium, callbackUrl)" if args.kind == "database" else "bucket"
    print(
        f"accept latency, {kind}, role {args.role}, {args.concurrency} concurrent callers, "
        "loopback, 2 cores shared with the load generator"
    )
    print(summary(f"burst of {args.concurrency} provisions", burst_latencies, burst_wall))
    print(f"  statuses: {dict(Counter(statuses))}")
    print(summary("GET /health", health, health_wall))
    print(summary("POST /v1/provision (202)", accept, accept_wall))
    ordered_h, ordered_a = sorted(health), sorted(accept)
    p95_h = ordered_h[round(0.95 * len(ordered_h)) - 1]
    p95_a = ordered_a[round(0.95 * len(ordered_a)) - 1]
    print(f"provision p95 / health p95 = {p95_a / p95_h:.2f}")


if __name__ == "__main__":
    main()
