"""End to end: N deployments from request to Ready callback against the emulator.

    .venv/bin/python bench/end_to_end.py [--deployments 100] [--namespaces 10]

The broker (`kidp-broker serve --emulate`, 4 worker threads, SQLite store and
queue, the emulator in the same process) runs in a child process; a
signature-checking callback receiver runs here. Deployments are spread over
namespaces because each namespace runs at most 10 provisions at once
(KIDP_NAMESPACE_CONCURRENCY).
"""

from __future__ import annotations

import argparse
import time

import httpx
from common import bearer, broker_process

from kidp.callbacks import generate_secret
from kidp.receiver import CallbackReceiver

#: A mix, because an AWS account holds 40 RDS instances by default (the quota
#: check refuses the 41st, as it should).
MIX = [
    ("database", {"engine": "postgresql", "version": "15", "size": "small"}),
    ("cache", {"engine": "redis", "version": "7.0", "size": "small"}),
    ("bucket", {"versioning": True}),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deployments", type=int, default=100)
    parser.add_argument("--namespaces", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--worker-processes", type=int, default=None)
    parser.add_argument("--worker-threads", type=int, default=None)
    args = parser.parse_args()
    secret = generate_secret()
    receiver = CallbackReceiver(secret)
    env = {
        "KIDP_CALLBACK_SECRET": secret,
        "KIDP_CALLBACK_ALLOWLIST": "127.0.0.1",
        "KIDP_POLL_INTERVAL_SECONDS": "1",
        "KIDP_RATE_LIMIT_PER_MINUTE": "100000",
    }
    if args.worker_threads:
        env["KIDP_WORKER_THREADS"] = str(args.worker_threads)
    serve_args = []
    if args.worker_processes is not None:
        serve_args = ["--worker-processes", str(args.worker_processes)]
    with (
        broker_process("all", *serve_args, **env) as base,
        httpx.Client(base_url=base, headers=bearer(["*"]), timeout=60) as client,
    ):
        # One of each kind first, untimed: the first call of each kind loads
        # the SDK's and the emulator's service models, which a running broker
        # has long done.
        for n, (kind, spec) in enumerate(MIX):
            client.post(
                "/v1/provision",
                json={
                    "resourceType": kind,
                    "resourceName": f"warm-{n}",
                    "namespace": "warm-up",
                    "team": "bench",
                    "owner": "bench@example.com",
                    "callbackUrl": receiver.url,
                    "spec": spec,
                },
            ).raise_for_status()
        warm: set[str] = set()
        while len(warm) < len(MIX):
            payload = receiver.received.get(timeout=args.timeout)
            if payload["phase"] == "Ready":
                warm.add(payload["deploymentId"])
        receiver.log.clear()
        started = time.perf_counter()
        for n in range(args.deployments):
            kind, spec = MIX[n % len(MIX)]
            response = client.post(
                "/v1/provision",
                json={
                    "resourceType": kind,
                    "resourceName": f"e2e-{n}",
                    "namespace": f"team-{n % args.namespaces}",
                    "team": "bench",
                    "owner": "bench@example.com",
                    "callbackUrl": receiver.url,
                    "spec": spec,
                },
            )
            if response.status_code != 202:
                raise SystemExit(f"provision {n} ({kind}): {response.status_code} {response.text}")
        accepted = time.perf_counter() - started
        ready: set[str] = set()
        deadline = time.monotonic() + args.timeout
        while len(ready) < args.deployments and time.monotonic() < deadline:
            payload = receiver.received.get(timeout=args.timeout)
            if payload["phase"] == "Ready":
                ready.add(payload["deploymentId"])
            elif payload["phase"] == "Failed":
                raise SystemExit(f"deployment failed: {payload['message']}")
        total = time.perf_counter() - started
    receiver.close()
    print(
        f"end to end, {args.deployments} deployments (PostgreSQL, Redis, S3 in turn) over "
        f"{args.namespaces} namespaces, AWS emulated, poll interval 1 s"
    )
    print(f"  all accepted in {accepted:.2f} s")
    print(
        f"  {len(ready)} Ready callbacks in {total:.2f} s = {len(ready) / total:.2f} deployments/s"
    )
    ready_calls = [p for _, p in receiver.log if p["phase"] == "Ready"]
    print(
        f"  Ready callbacks received: {len(ready_calls)} "
        f"(duplicates: {len(ready_calls) - len(set(p['deploymentId'] for p in ready_calls))})"
    )


if __name__ == "__main__":
    main()
