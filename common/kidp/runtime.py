"""The embedded runtime: API, worker threads and timers in one process.

This is the pull-queue worker edge: it leases jobs, works each through
:func:`kidp.work.work` and maps the outcome to the queue's ack, retry (with
backoff) or dead letter.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kidp.bootstrap import Broker
from kidp.ports import Delivery
from kidp.scans import run_scan
from kidp.work import work

log = logging.getLogger("kidp.runtime")

ROLES = ("all", "api", "worker", "scanner")


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

    def start(self) -> None:
        """Start the parts this role runs; returns once the API listens."""
        import uvicorn

        if self.role in ("all", "worker"):
            for n in range(self.broker.settings.worker_threads):
                worker = Worker(self.broker)
                self.workers.append(worker)
                self._spawn(f"worker-{n}", worker.run)
        if self.role in ("all", "scanner"):
            self.scheduler = Scheduler(self.broker)
            self._spawn("scheduler", self.scheduler.run)
        if self.role in ("all", "api"):
            config = uvicorn.Config(
                self.broker.app,
                host=self.host,
                port=self.port,
                log_config=None,
                access_log=False,
                timeout_graceful_shutdown=10,
                backlog=2048,
            )
            self.server = uvicorn.Server(config)
            self._spawn("api", self.server.run)
            deadline = time.monotonic() + 30
            while not self.server.started:
                if time.monotonic() > deadline or not self.threads[-1].is_alive():
                    raise RuntimeError(f"API server did not start on {self.host}:{self.port}")
                time.sleep(0.02)

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful: stop taking requests and jobs, let in-flight jobs finish."""
        if self.server is not None:
            self.server.should_exit = True
        for worker in self.workers:
            worker.stop()
        if self.scheduler is not None:
            self.scheduler.stop()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.broker.close()

    def wait(self) -> None:
        """Block until a signal (SIGINT/SIGTERM) asks the process to stop."""
        import signal

        stopping = threading.Event()

        def _ask_stop(signum: int, frame: Any) -> None:
            log.info("shutting down", extra={"signal": signum})
            stopping.set()

        signal.signal(signal.SIGINT, _ask_stop)
        signal.signal(signal.SIGTERM, _ask_stop)
        while not stopping.wait(0.5):
            if self.role in ("all", "api") and not any(
                t.name == "api" and t.is_alive() for t in self.threads
            ):
                break
        self.stop()
