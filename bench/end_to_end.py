"""End to end: N deployments from request to Ready callback against the emulator.

    .venv/bin/python bench/end_to_end.py [--deployments 100] [--namespaces 10]
                                         [--concurrency 10] [--worker-processes 1]

The broker is `kidp-broker serve --emulate` in a child process: the API in
that process, the workers, watcher and timers in a second, the emulated AWS in
a third; SQLite store and queue. A signature-checking callback receiver runs
here. One deployment of each kind goes first, untimed (a running broker has
long loaded its SDK models); then the clock runs from the first request to
the last Ready callback, with ``--concurrency`` callers submitting (1: one
after the other). Deployments are spread over namespaces because each
namespace runs at most 10 provisions at once (KIDP_NAMESPACE_CONCURRENCY).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from common import bearer, broker_process, submit, wait_ready

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
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--deployments", type=int, default=100)
    parser.add_argument("--namespaces", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=10, help="callers submitting")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--worker-processes", type=int, default=1)
    parser.add_argument("--worker-threads", type=int, default=4)
    args = parser.parse_args()
    secret = generate_secret()
    receiver = CallbackReceiver(secret)
    env = {
        "KIDP_CALLBACK_SECRET": secret,
        "KIDP_CALLBACK_ALLOWLIST": "127.0.0.1",
        "KIDP_POLL_INTERVAL_SECONDS": "1",
        "KIDP_RATE_LIMIT_PER_MINUTE": "100000",
        "KIDP_WORKER_THREADS": str(args.worker_threads),
    }

    def body(prefix: str, namespaces: int) -> Callable[[int], dict[str, object]]:
        def make(n: int) -> dict[str, object]:
            kind, spec = MIX[n % len(MIX)]
            return {
                "resourceType": kind,
                "resourceName": f"{prefix}-{n}",
                "namespace": f"{prefix}-{n % namespaces}",
                "team": "bench",
                "owner": "bench@example.com",
                "callbackUrl": receiver.url,
                "spec": spec,
            }

        return make

    headers = bearer(["*"])
    serve = ["--worker-processes", str(args.worker_processes)]
    with broker_process("all", *serve, **env) as base:
        submit(base, body("warm", 1), len(MIX), 1, headers)
        wait_ready(receiver, len(MIX), args.timeout, prefix="warm-")
        receiver.log.clear()
        started = time.perf_counter()
        accepted = submit(
            base,
            body("e2e", args.namespaces),
            args.deployments,
            args.concurrency,
            headers,
        )
        ready = wait_ready(receiver, args.deployments, args.timeout, prefix="e2e-")
        total = time.perf_counter() - started
    receiver.close()
    print(
        f"end to end, {args.deployments} deployments (PostgreSQL, Redis, S3 in turn) over "
        f"{args.namespaces} namespaces, AWS emulated, poll interval 1 s, "
        f"{args.concurrency} submitting callers, {args.worker_processes} worker process(es) "
        f"of {args.worker_threads} threads"
    )
    print(f"  all accepted in {accepted:.2f} s")
    print(
        f"  {len(ready)} Ready callbacks in {total:.2f} s = {len(ready) / total:.2f} deployments/s"
    )
    ready_calls = [p for _, p in receiver.log if p["phase"] == "Ready"]
    print(
        f"  Ready callbacks received: {len(ready_calls)} "
        f"(duplicates: {len(ready_calls) - len({p['deploymentId'] for p in ready_calls})})"
    )


if __name__ == "__main__":
    main()
