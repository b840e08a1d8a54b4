"""The on-prem topology under load: two api replicas, two workers, a watcher and a scanner
(separate processes) sharing PostgreSQL and NATS JetStream, provisioning into
the Kubernetes stand-in.

    .venv/bin/python bench/onprem.py [--requests 2000] [--concurrency 100] [--deployments 100]

Prints, at ``--concurrency`` callers spread over both api replicas:
* accepted provisions per second and the accept latency (202) percentiles;
* end to end: deployments per second from the first request to the last
  Ready callback, through NATS and the workers.

Needs PostgreSQL on 127.0.0.1:5432 and NATS on 127.0.0.1:4222; a scratch
database and stream are created and dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg
from common import SECRET, bearer, load, submit, summary, wait_ready

from kidp.callbacks import generate_secret
from kidp.localcluster import LocalCluster
from kidp.receiver import CallbackReceiver

ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def provision_body(prefix: str, callback_url: str | None) -> Callable[[int], dict[str, object]]:
    def make(n: int) -> dict[str, object]:
        body: dict[str, object] = {
            "resourceType": "database",
            "resourceName": f"{prefix}-{n}",
            "namespace": f"bench-{n % 20}",
            "team": "bench",
            "owner": "bench@example.com",
            "spec": {"engine": "postgresql", "version": "15", "size": "small"},
        }
        if callback_url:
            body["callbackUrl"] = callback_url
        return body

    return make


def drop_stream(stream: str) -> None:
    import nats

    async def drop() -> None:
        connection = await nats.connect("nats://127.0.0.1:4222")
        try:
            for name in (stream, f"{stream}_DEAD"):
                try:
                    await connection.jetstream().delete_stream(name)
                except nats.js.errors.NotFoundError:
                    continue
        finally:
            await connection.close()

    asyncio.run(drop())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--deployments", type=int, default=100)
    parser.add_argument(
        "--submitters", type=int, default=10, help="callers submitting the end-to-end deployments"
    )
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()

    database = f"kidp_bench_{uuid.uuid4().hex[:8]}"
    stream = f"KIDP_BENCH_{uuid.uuid4().hex[:8].upper()}"
    callback_secret = generate_secret()
    receiver = CallbackReceiver(callback_secret)
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    headers = bearer(["*"])
    try:
        with (
            tempfile.TemporaryDirectory() as state,
            LocalCluster(
                store_url=f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}",
                queue_url=f"nats://127.0.0.1:4222/{stream}",
                state_dir=Path(state),
                env={
                    "KIDP_JWT_SECRET": SECRET,
                    "KIDP_CALLBACK_SECRET": callback_secret,
                    "KIDP_CALLBACK_ALLOWLIST": "127.0.0.1",
                    "KIDP_POLL_INTERVAL_SECONDS": "0.5",
                    "KIDP_RATE_LIMIT_PER_MINUTE": "100000000",
                    "KIDP_NAMESPACE_CONCURRENCY": "1000",
                    "KIDP_LOG_LEVEL": "WARNING",
                },
            ) as cluster,
        ):
            bases = [proc.url for proc in cluster.api]
            # Warm up connections and caches before measuring.
            asyncio.run(load(bases, "GET", "/health", 200, args.concurrency, None, headers))
            # And a few deployments through every process, untimed: a running
            # cluster has long loaded its clients and models.
            submit(bases, provision_body("warm", receiver.url), 4, 2, headers)
            wait_ready(receiver, 4, args.timeout, prefix="warm-")
            started = time.perf_counter()
            submit(
                bases,
                provision_body("e2e", receiver.url),
                args.deployments,
                args.submitters,
                headers,
            )
            ready = wait_ready(receiver, args.deployments, args.timeout, prefix="e2e-")
            total = time.perf_counter() - started
            # Then the accept path alone: its provisions are not waited for.
            accept, accept_wall = asyncio.run(
                load(
                    bases,
                    "POST",
                    "/v1/provision",
                    args.requests,
                    args.concurrency,
                    provision_body("accept", None),
                    headers,
                )
            )
    finally:
        receiver.close()
        drop_stream(stream)
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    print(
        f"on-prem: 2 api replicas + 2 workers + watcher + scanner (processes), PostgreSQL store, "
        f"NATS JetStream queue, Kubernetes stand-in; {args.concurrency} concurrent callers, "
        "2 cores shared with the load generator"
    )
    print(summary("POST /v1/provision (202)", accept, accept_wall))
    print(
        f"end to end ({args.submitters} submitting callers): {len(ready)}/{args.deployments} "
        f"deployments Ready in {total:.1f} s = {len(ready) / total:.1f} deployments/s"
    )


if __name__ == "__main__":
    main()
