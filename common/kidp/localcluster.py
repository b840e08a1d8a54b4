"""The on-prem topology on one machine: a Kubernetes stand-in, api replicas,
workers, a watcher and a scanner, each a separate ``kidp-broker serve`` process sharing
PostgreSQL and NATS JetStream, as the manifests in ``infra/onprem`` run them.

The scale and fault tests and ``bench/onprem.py`` use it: processes can be
killed with SIGKILL and started again, which is what a node failure does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kidp.emulator import free_port


@dataclass
class BrokerProcess:
    """One ``kidp-broker serve --role <role>`` process."""

    role: str
    name: str
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class LocalCluster:
    """Start with :meth:`start`, stop with :meth:`stop` (or use as a context manager)."""

    store_url: str
    queue_url: str
    state_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    api_replicas: int = 2
    workers: int = 2
    watcher: bool = True
    #: The scanner runs reconcile, which re-creates the job or callback a
    #: worker killed between saving a deployment and enqueueing its next job
    #: took with it; without one such a deployment waits forever.
    scanner: bool = True
    redis_url: str | None = None
    kube_ready_delay: float = 0.2
    processes: list[BrokerProcess] = field(default_factory=list)
    kube: BrokerProcess | None = None
    kubeconfig: Path | None = None

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- start

    def start(self, *, timeout: float = 60.0) -> None:
        """Start the Kubernetes stand-in, then every broker process; returns once
        each api replica answers ``/health``."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.kubeconfig = self.state_dir / "kubeconfig"
        kube_port = free_port()
        self.kube = BrokerProcess("kubernetes", "kube-api", kube_port, self._log_path("kube-api"))
        self._spawn(
            self.kube,
            [
                sys.executable,
                "-m",
                "kidp.kube_emulator",
                "--port",
                str(kube_port),
                "--kubeconfig",
                str(self.kubeconfig),
                "--ready-delay",
                str(self.kube_ready_delay),
            ],
        )
        _wait_for(lambda: self.kubeconfig is not None and self.kubeconfig.exists(), timeout)
        for n in range(self.api_replicas):
            self.processes.append(self._broker("api", f"api-{n}"))
        for n in range(self.workers):
            self.processes.append(self._broker("worker", f"worker-{n}"))
        if self.watcher:
            self.processes.append(self._broker("watcher", "watcher"))
        if self.scanner:
            self.processes.append(self._broker("scanner", "scanner"))
        for proc in self.processes:
            self.launch(proc)
        for proc in self.processes:
            _wait_for(lambda proc=proc: _healthy(proc), timeout, what=f"{proc.name} health")

    @property
    def api(self) -> list[BrokerProcess]:
        return [p for p in self.processes if p.role == "api"]

    def role(self, role: str) -> list[BrokerProcess]:
        return [p for p in self.processes if p.role == role]

    def _broker(self, role: str, name: str) -> BrokerProcess:
        # Every role listens: the api serves the API, the others their probes.
        return BrokerProcess(role, name, free_port(), self._log_path(name))

    def _log_path(self, name: str) -> Path:
        return self.state_dir / f"{name}.log"

    def broker_env(self) -> dict[str, str]:
        """The environment every broker process gets (the manifests' ConfigMap)."""
        env = {
            **os.environ,
            "KIDP_PROVIDER": "onprem",
            "KIDP_CLOUD": "onprem",
            "KIDP_STORE_URL": self.store_url,
            "KIDP_QUEUE_URL": self.queue_url,
            "KIDP_STATE_DIR": str(self.state_dir / "state"),
            "KUBECONFIG": str(self.kubeconfig),
            **self.env,
        }
        if self.redis_url:
            env["KIDP_REDIS_URL"] = self.redis_url
        return env

    def launch(self, proc: BrokerProcess) -> None:
        """Start (or restart) one broker process."""
        command = [sys.executable, "-m", "kidp.cli", "serve", "--role", proc.role]
        command += ["--host", "127.0.0.1", "--port", str(proc.port)]
        self._spawn(proc, command, env=self.broker_env())

    def _spawn(
        self, proc: BrokerProcess, command: list[str], env: dict[str, str] | None = None
    ) -> None:
        if proc._log is not None:
            proc._log.close()
        proc._log = proc.log_path.open("ab")
        # The command is this interpreter running kidp modules: no outside input.
        proc.process = subprocess.Popen(  # noqa: S603
            command, stdout=proc._log, stderr=subprocess.STDOUT, env=env or dict(os.environ)
        )

    # ------------------------------------------------------------------ faults

    def kill(self, proc: BrokerProcess) -> None:
        """SIGKILL: no shutdown hook runs, in-flight work is simply lost."""
        if proc.process is not None and proc.alive:
            proc.process.send_signal(signal.SIGKILL)
            proc.process.wait(10)

    # -------------------------------------------------------------------- stop

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM everything (graceful: in-flight jobs finish), then the stand-in."""
        for proc in self.processes:
            if proc.alive and proc.process is not None:
                proc.process.send_signal(signal.SIGTERM)
        for proc in self.processes:
            _reap(proc, timeout)
        if self.kube is not None:
            if self.kube.alive and self.kube.process is not None:
                self.kube.process.send_signal(signal.SIGTERM)
            _reap(self.kube, timeout)

    def logs(self) -> str:
        """Every process's log, for a failing test's report."""
        parts = []
        for proc in [*([self.kube] if self.kube else []), *self.processes]:
            if proc.log_path.exists():
                parts.append(
                    f"--- {proc.name}\n{proc.log_path.read_text(errors='replace')[-4000:]}"
                )
        return "\n".join(parts)


def _reap(proc: BrokerProcess, timeout: float) -> None:
    if proc.process is not None:
        try:
            proc.process.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.process.kill()
            proc.process.wait(10)
    if proc._log is not None:
        proc._log.close()
        proc._log = None


def _healthy(proc: BrokerProcess) -> bool:
    import httpx

    if not proc.alive:
        raise RuntimeError(f"{proc.name} exited; see {proc.log_path}")
    try:
        return httpx.get(f"{proc.url}/health", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def _wait_for(check: Any, timeout: float, *, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached after {timeout} s")
        time.sleep(0.1)
