"""The embedded runtime: API, worker threads and timers in one process.

This is the pull-queue worker edge: it leases jobs, works each through
:func:`kidp.work.work` and maps the outcome to the queue's ack, retry (with
backoff) or dead letter.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kidp.bootstrap import Broker
from kidp.errors import ValidationFailed
from kidp.ports import ChangeWatcher, Delivery, WatchableProvider
from kidp.scans import run_scan
from kidp.work import work

log = logging.getLogger("kidp.runtime")

#: The parts a broker process can run; ``all`` is every one of them.
PARTS = ("api", "worker", "watcher", "scanner")
ROLES = ("all", *PARTS)


def role_parts(role: str) -> frozenset[str]:
    """The parts named by ``role``: ``all``, one part, or a comma-separated list
    (``worker,watcher,scanner`` is what ``serve`` runs beside its API process)."""
    names = [name.strip() for name in role.split(",") if name.strip()]
    if names == ["all"]:
        return frozenset(PARTS)
    unknown = sorted(set(names) - set(PARTS))
    if unknown or not names:
        raise ValidationFailed(
            f"unknown role '{role}': use all, or one or more of {', '.join(PARTS)} "
            "separated by commas"
        )
    return frozenset(names)


class Worker:
    """Leases jobs from the queue and works them until stopped."""

    def __init__(self, broker: Broker, *, idle_wait: float = 0.2) -> None:
        self.broker = broker
        self.idle_wait = idle_wait
        self._stop = threading.Event()
        self.busy = threading.Event()

    def run_once(self) -> int:
        """Work the jobs due now (one lease); returns how many were worked."""
        settings = self.broker.settings
        deliveries = self.broker.service.queue.receive(
            max_jobs=1, lease_seconds=settings.job_lease_seconds
        )
        for delivery in deliveries:
            self.busy.set()
            try:
                self._work(delivery)
            finally:
                self.busy.clear()
        return len(deliveries)

    def _work(self, delivery: Delivery) -> None:
        queue = self.broker.service.queue
        outcome = work(
            self.broker.service,
            delivery.job,
            attempt=delivery.attempt,
            max_deliveries=self.broker.settings.job_max_deliveries,
        )
        if outcome.action == "ack":
            queue.ack(delivery)
        elif outcome.action == "retry":
            queue.retry(delivery, delay=outcome.delay)
        else:
            queue.dead_letter(delivery, reason=outcome.reason)

    def run(self) -> None:
        """Loop until :meth:`stop`; a job in progress always finishes."""
        while not self._stop.is_set():
            try:
                worked = self.run_once()
            except Exception:
                log.exception("worker loop error")
                worked = 0
            if not worked:
                self._stop.wait(self.idle_wait)

    def stop(self) -> None:
        self._stop.set()


@dataclass
class Timer:
    name: str
    interval: float
    next_at: float


class Scheduler:
    """Runs the scans on their intervals (the embedded service's timers)."""

    def __init__(self, broker: Broker, *, clock: Callable[[], float] = time.monotonic) -> None:
        s = broker.settings
        self.broker = broker
        self.clock = clock
        now = clock()
        # Reconcile first: after a crash it re-creates whatever the crash lost.
        self.timers = [
            Timer("reconcile", s.reconcile_interval_seconds, now),
            Timer("drift", s.drift_interval_seconds, now + s.drift_interval_seconds),
            Timer("orphans", s.orphan_interval_seconds, now + s.orphan_interval_seconds),
            Timer("cost", s.cost_interval_seconds, now + 60),
            Timer("rotation", s.rotation_interval_seconds, now + 120),
        ]
        self._stop = threading.Event()

    def run_due(self) -> list[str]:
        """Run every timer that is due; returns their names."""
        ran = []
        for timer in self.timers:
            if self.clock() < timer.next_at:
                continue
            timer.next_at = self.clock() + timer.interval
            try:
                result = run_scan(self.broker.scanner, timer.name)
                log.debug("scan finished", extra={"scan": timer.name, "result": result})
            except Exception:
                log.exception("scan failed", extra={"scan": timer.name})
            ran.append(timer.name)
        return ran

    def run(self) -> None:
        while not self._stop.is_set():
            self.run_due()
            self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()


class ProbeServer:
    """``/health``, ``/readiness`` and ``/metrics`` for roles without the API
    (worker, watcher, scanner), so their pods are probed and scraped like the
    api's. Standard library only: three read-only routes need no framework."""

    def __init__(self, broker: Broker, *, host: str, port: int) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        service = broker.service

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, service.render_metrics(), "text/plain; version=0.0.4")
                    return
                probe = {"/health": service.health, "/readiness": service.readiness}.get(path)
                if probe is None:
                    self._send(404, b'{"error":"not_found","message":"no such probe","code":404}')
                    return
                ok, body = probe()
                self._send(200 if ok else 503, json.dumps(body, default=str).encode())

            def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return  # probes every few seconds would drown the JSON log

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.started = True

    def run(self) -> None:
        self._server.serve_forever(poll_interval=0.5)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class PlainServer:
    """HTTP/1.1 on uvicorn: the fastest Python server for plain HTTP."""

    def __init__(self, app: Any, *, host: str, port: int) -> None:
        import uvicorn

        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=10,
            backlog=2048,
        )
        self._server = uvicorn.Server(config)

    @property
    def started(self) -> bool:
        return bool(self._server.started)

    def run(self) -> None:
        self._server.run()

    def stop(self) -> None:
        self._server.should_exit = True


class TlsServer:
    """HTTPS with TLS 1.3 only and HTTP/2 (ALPN h2, then http/1.1), on hypercorn:
    uvicorn speaks no HTTP/2. Shutdown lets in-flight requests finish."""

    def __init__(self, app: Any, *, host: str, port: int, certfile: str, keyfile: str) -> None:
        import ssl

        from hypercorn.config import Config

        class Tls13Config(Config):
            def create_ssl_context(self) -> ssl.SSLContext | None:
                context: ssl.SSLContext | None = super().create_ssl_context()
                if context is not None:
                    context.minimum_version = ssl.TLSVersion.TLSv1_3
                return context

        config = Tls13Config()
        config.bind = [f"{host}:{port}"]
        config.certfile = certfile
        config.keyfile = keyfile
        config.alpn_protocols = ["h2", "http/1.1"]
        config.graceful_timeout = 10.0
        config.accesslog = None
        config.errorlog = logging.getLogger("kidp.http")
        self._config = config
        self._app = app
        self.started = False
        self._loop: Any = None
        self._stopping: Any = None

    def run(self) -> None:
        import asyncio

        from hypercorn.asyncio import serve

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stopping = asyncio.Event()
            task = asyncio.ensure_future(
                serve(self._app, self._config, shutdown_trigger=self._stopping.wait)
            )
            while not task.done() and not _listening(self._config.bind[0]):
                await asyncio.sleep(0.02)
            self.started = True
            await task

        asyncio.run(main())

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)


def _listening(bind: str) -> bool:
    import socket

    host, _, port = bind.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class EmbeddedBroker:
    """API server, workers and scheduler in threads of this process."""

    broker: Broker
    host: str = "127.0.0.1"
    port: int = 8082
    role: str = "all"
    workers: list[Worker] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    server: Any = None
    scheduler: Scheduler | None = None
    watcher: ChangeWatcher | None = None

    @property
    def parts(self) -> frozenset[str]:
        """What this process runs (see :func:`role_parts`)."""
        return role_parts(self.role)

    def start(self) -> None:
        """Start the parts this role runs; returns once the API listens."""
        parts = self.parts
        if "watcher" in parts:
            provider = self.broker.service.provider
            if isinstance(provider, WatchableProvider):
                self.watcher = provider.change_watcher(self.broker.service.changed)
                self.watcher.start()
            elif parts == {"watcher"}:
                raise ValidationFailed(
                    f"provider '{provider.name}' has no watch API; its changes are found "
                    "by polls and the drift scan"
                )
        if "worker" in parts:
            self.broker.service.sender.warm_up()
            for n in range(self.broker.settings.worker_threads):
                worker = Worker(self.broker)
                self.workers.append(worker)
                self._spawn(f"worker-{n}", worker.run)
        if "scanner" in parts:
            self.scheduler = Scheduler(self.broker)
            self._spawn("scheduler", self.scheduler.run)
        if "api" in parts:
            settings = self.broker.settings
            if settings.tls_cert_file is not None:
                self.server = TlsServer(
                    self.broker.app,
                    host=self.host,
                    port=self.port,
                    certfile=str(settings.tls_cert_file),
                    keyfile=str(settings.tls_key_file or settings.tls_cert_file),
                )
            else:
                self.server = PlainServer(self.broker.app, host=self.host, port=self.port)
            self._spawn("api", self.server.run)
        elif self.port:
            self.server = ProbeServer(self.broker, host=self.host, port=self.port)
            self._spawn("probes", self.server.run)
        if isinstance(self.server, (PlainServer, TlsServer)):
            deadline = time.monotonic() + 30
            while not self.server.started:
                if time.monotonic() > deadline or not self.threads[-1].is_alive():
                    self.stop(timeout=5)
                    raise ValidationFailed(
                        f"the API could not listen on {self.host}:{self.port} (is the "
                        "port in use? the log above says why); choose another with --port"
                    )
                time.sleep(0.02)

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful: stop taking requests and jobs, let in-flight jobs finish."""
        if self.server is not None:
            self.server.stop()
        if self.watcher is not None:
            self.watcher.stop()
        for worker in self.workers:
            worker.stop()
        if self.scheduler is not None:
            self.scheduler.stop()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.broker.close()

    def wait(self, *, tick: Callable[[], None] | None = None) -> None:
        """Block until a signal (SIGINT/SIGTERM) asks the process to stop, or the
        API server ends; ``tick`` runs every half second meanwhile (the
        supervisor restarting a child process that died)."""
        import signal

        stopping = threading.Event()

        def _ask_stop(signum: int, frame: Any) -> None:
            log.info("shutting down", extra={"signal": signum})
            stopping.set()

        signal.signal(signal.SIGINT, _ask_stop)
        signal.signal(signal.SIGTERM, _ask_stop)
        serves_api = "api" in self.parts
        while not stopping.wait(0.5):
            if serves_api and not any(t.name == "api" and t.is_alive() for t in self.threads):
                break
            if tick is not None:
                tick()
        self.stop()
