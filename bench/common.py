"""Shared by the benchmarks: start a broker process on the emulator, mint a
token, and summarise latencies. Not imported by the broker itself."""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SECRET = "bench-secret-" + "x" * 32


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def broker_process(role: str = "all", **env: str) -> Iterator[str]:
    """``kidp-broker serve --emulate --role ROLE`` in a child process; yields its URL."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="kidp-bench-") as state:
        environ = {
            **os.environ,
            "KIDP_STATE_DIR": state,
            "KIDP_STORE_URL": f"sqlite:///{state}/broker.db",
            "KIDP_JWT_SECRET": SECRET,
            "KIDP_LOG_LEVEL": "WARNING",
            **env,
        }
        exe = Path(sys.executable).with_name("kidp-broker")
        proc = subprocess.Popen(
            [str(exe), "serve", "--emulate", "--port", str(port), "--role", role],
            env=environ,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{base}/readiness", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("broker did not become ready")
                time.sleep(0.2)
            yield base
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def bearer(namespaces: list[str]) -> dict[str, str]:
    from kidp.auth import mint_token

    token = mint_token(
        secret=SECRET,
        subject="bench",
        scopes=["deploy", "read", "delete"],
        namespaces=namespaces,
        ttl_seconds=3600,
        issuer="kidp",
        audience="kidp-broker",
    )
    return {"Authorization": f"Bearer {token}"}


def summary(name: str, latencies: list[float], wall: float) -> str:
    """One line: count, throughput and p50/p95/p99 in milliseconds."""
    ordered = sorted(latencies)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, round(p / 100 * len(ordered)) - 1)] * 1000

    return (
        f"{name:<28} n={len(ordered):<5} {len(ordered) / wall:7.1f} req/s  "
        f"p50={pct(50):6.1f} ms  p95={pct(95):6.1f} ms  p99={pct(99):6.1f} ms  "
        f"mean={statistics.fmean(ordered) * 1000:6.1f} ms"
    )
