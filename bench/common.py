"""Shared by the benchmarks: start a broker process on the emulator, mint a
token, load the API, and summarise latencies. Not imported by the broker itself."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
SECRET = "bench-secret-" + "x" * 32


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def broker_process(role: str = "all", *args: str, **env: str) -> Iterator[str]:
    """``kidp-broker serve --emulate --role ROLE [ARGS]`` in a child process (its
    emulated cloud and workers in processes of their own); yields its URL."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="kidp-bench-") as state:
        environ = {
            **{k: v for k, v in os.environ.items() if not k.startswith("KIDP_")},
            "KIDP_STATE_DIR": state,
            "KIDP_JWT_SECRET": SECRET,
            "KIDP_LOG_LEVEL": "WARNING",
            **env,
        }
        exe = Path(sys.executable).with_name("kidp-broker")
        proc = subprocess.Popen(
            [str(exe), "serve", "--emulate", "--port", str(port), "--role", role, *args],
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


def _request(
    method: str, path: str, host: str, port: str, body: bytes, headers: dict[str, str]
) -> bytes:
    head = [
        f"{method} {path} HTTP/1.1",
        f"Host: {host}:{port}",
        f"Content-Length: {len(body)}",
        "Content-Type: application/json",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _status(reader: asyncio.StreamReader) -> int:
    """Read one response off a keep-alive connection; its status code."""
    status_line = await reader.readline()
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.lower() == "content-length":
            length = int(value)
    await reader.readexactly(length)
    return int(status_line.split()[1])


async def load(
    base: str | list[str],
    method: str,
    path: str,
    total: int,
    concurrency: int,
    make_body: Callable[[int], dict[str, object]] | None,
    headers: dict[str, str],
    statuses: list[int] | None = None,
) -> tuple[list[float], float]:
    """``total`` requests over ``concurrency`` keep-alive connections; each
    response's status is appended to ``statuses`` when given.

    A minimal HTTP/1.1 client on asyncio streams: httpx's async pool tops out
    near 200 requests/s on this machine even against a do-nothing server, so
    it would measure itself rather than the broker. With several ``base``
    URLs (replicas), callers are spread over them in turn, as a Service would.
    """
    bases = [base] if isinstance(base, str) else base
    latencies: list[float] = []
    counter = iter(range(total))
    failures = 0

    async def caller(index: int) -> None:
        nonlocal failures
        host, port = bases[index % len(bases)].removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for n in counter:
                body = json.dumps(make_body(n)).encode() if make_body else b""
                started = time.perf_counter()
                writer.write(_request(method, path, host, port, body, headers))
                await writer.drain()
                status = await _status(reader)
                latencies.append(time.perf_counter() - started)
                if statuses is not None:
                    statuses.append(status)
                if status >= 400:
                    failures += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    wall = time.perf_counter() - started
    if failures:
        print(f"  ({failures} responses were errors)")
    return latencies, wall


async def burst(
    base: str,
    path: str,
    callers: int,
    make_body: Callable[[int], dict[str, object]],
    headers: dict[str, str],
) -> tuple[list[float], float, list[int]]:
    """``callers`` connections, each sending one POST at the same moment (the
    connections are opened first, so only the requests are timed)."""
    host, port = base.removeprefix("http://").split(":")
    connections = [await asyncio.open_connection(host, int(port)) for _ in range(callers)]
    latencies: list[float] = []
    statuses: list[int] = []
    gate = asyncio.Event()

    async def caller(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = _request("POST", path, host, port, json.dumps(make_body(n)).encode(), headers)
        await gate.wait()
        started = time.perf_counter()
        writer.write(request)
        await writer.drain()
        statuses.append(await _status(reader))
        latencies.append(time.perf_counter() - started)
        writer.close()

    tasks = [asyncio.ensure_future(caller(n, r, w)) for n, (r, w) in enumerate(connections)]
    await asyncio.sleep(0.05)
    started = time.perf_counter()
    gate.set()
    await asyncio.gather(*tasks)
    return latencies, time.perf_counter() - started, statuses


def submit(
    base: str | list[str],
    bodies: Callable[[int], dict[str, object]],
    total: int,
    concurrency: int,
    headers: dict[str, str],
) -> float:
    """POST ``total`` provisions over ``concurrency`` callers (as a platform
    applying a team's stack would); the seconds it took. Exits unless every
    one was accepted (202)."""
    statuses: list[int] = []
    _, wall = asyncio.run(
        load(base, "POST", "/v1/provision", total, concurrency, bodies, headers, statuses)
    )
    if statuses.count(202) != total:
        raise SystemExit(f"not every provision was accepted: {Counter(statuses)}")
    return wall


def wait_ready(receiver: Any, ids: int, timeout: float, *, prefix: str = "") -> set[str]:
    """Read callbacks until ``ids`` distinct deployments (whose resource name
    starts with ``prefix``) are Ready; exits on a Failed one."""
    ready: set[str] = set()
    deadline = time.monotonic() + timeout
    while len(ready) < ids and time.monotonic() < deadline:
        payload = receiver.received.get(timeout=max(0.1, deadline - time.monotonic()))
        if payload["phase"] == "Failed":
            raise SystemExit(f"deployment failed: {payload['message']}")
        if payload["phase"] == "Ready" and payload["resourceName"].startswith(prefix):
            ready.add(payload["deploymentId"])
    return ready
