"""A restarted PostgreSQL loses nothing the broker was told is committed.

The test makes a throwaway cluster of its own (initdb in a temporary
directory, a free port), so it can kill -9 the postmaster without touching the
shared server on 5432. PostgreSQL refuses to run as root: as root, the server
programs run as the ``postgres`` user through ``runuser``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from tests.conftest import IN_CI

from kidp.errors import StoreUnavailable
from kidp.models import Deployment, Job, JobKind, ResourceType
from kidp.queues.sql import SqlJobQueue
from kidp.stores.sql import SqlDeploymentStore

PG_BIN = Path(os.environ.get("KIDP_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
SERVER_USER = "postgres"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason}; CI=true requires it", pytrace=False)
    pytest.skip(reason)


class PrivatePostgres:
    """One PostgreSQL cluster in a temporary directory, run by this test."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self.as_server_user: list[str] = []
        if os.geteuid() == 0:
            self.as_server_user = ["runuser", "-u", SERVER_USER, "--"]
            pw = pwd.getpwnam(SERVER_USER)
            os.chown(root, pw.pw_uid, pw.pw_gid)
        self.process: subprocess.Popen[bytes] | None = None

    def initdb(self) -> None:
        subprocess.run(
            [
                *self.as_server_user,
                str(PG_BIN / "initdb"),
                *("-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8"),
                "--no-sync",  # initdb's own files only; the server syncs as usual
            ],
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        log = (self.root / "server.log").open("ab")
        self.process = subprocess.Popen(
            [
                *self.as_server_user,
                str(PG_BIN / "postgres"),
                *("-D", str(self.data), "-p", str(self.port), "-k", str(self.root)),
                *("-c", "listen_addresses=127.0.0.1", "-c", "fsync=on"),
            ],
            stdout=log,
            stderr=log,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                psycopg.connect(self.url.replace("+psycopg", ""), connect_timeout=1).close()
                return
            except psycopg.OperationalError:
                time.sleep(0.1)
        raise AssertionError(f"PostgreSQL did not start; see {self.root / 'server.log'}")

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().splitlines()[0])

    def crash(self) -> None:
        """kill -9 the postmaster and every backend: no shutdown checkpoint at all."""
        pid = self.postmaster_pid()
        children = subprocess.run(
            ["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False
        ).stdout.split()
        for victim in [pid, *map(int, children)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        for victim in [pid, *map(int, children)]:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and Path(f"/proc/{victim}").exists():
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(victim, os.WNOHANG)
                time.sleep(0.02)
        if self.process is not None:
            self.process.wait(timeout=10)  # runuser, when it is the parent

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
            os.kill(self.postmaster_pid(), signal.SIGQUIT)  # immediate shutdown
        self.process.wait(timeout=10)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    if not (PG_BIN / "initdb").exists():
        unavailable(f"PostgreSQL server programs are not installed in {PG_BIN}")
    if os.geteuid() == 0 and (shutil.which("runuser") is None or not _user_exists(SERVER_USER)):
        unavailable("running as root needs runuser and a 'postgres' user for the server")
    # Not pytest's tmp_path: it is private to root, and the server runs as postgres.
    root = Path(tempfile.mkdtemp(prefix="kidp-pg-"))
    server = PrivatePostgres(root)
    try:
        server.initdb()
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def refused_quickly(call: Callable[[], object]) -> None:
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        call()
    assert time.monotonic() - started < 5


@pytest.mark.slow
def test_a_restarted_postgres_loses_nothing_committed(
    private_postgres: PrivatePostgres, make: Callable[..., Deployment]
) -> None:
    def deployment(n: int) -> Deployment:
        # One application's databases, as the on-prem broker records them.
        return make(
            f"orders-db-{n}",
            application="orders",
            resource_uid=f"5f0c6a4e-0000-4000-8000-{n:012d}",
            provider="onprem",
            region="dc-1",
        )

    store = SqlDeploymentStore(private_postgres.url)
    queue = SqlJobQueue(store.engine)
    try:
        committed = [store.create(deployment(n)) for n in range(20)]
        jobs = [Job(kind=JobKind.PROVISION, deployment_id=d.id) for d in committed]
        for job in jobs:
            queue.enqueue(job)
        [leased] = queue.receive(max_jobs=1, lease_seconds=1.0)

        private_postgres.crash()

        # While it is down every call fails fast with a temporary error.
        refused_quickly(lambda: store.get(committed[0].id))
        refused_quickly(lambda: store.create(deployment(99)))
        refused_quickly(lambda: queue.enqueue(Job(kind=JobKind.POLL, deployment_id="x")))
        refused_quickly(lambda: queue.receive(max_jobs=1, lease_seconds=1.0))
        refused_quickly(store.check)

        private_postgres.start()  # crash recovery replays the WAL

        # The same store and queue carry on: the pool replaces dead connections.
        for d in committed:
            assert store.get(d.id) == d
        assert store.find_active("team-a", ResourceType.DATABASE, "orders-db-99") is None
        assert queue.pending_count() == len(jobs)
        time.sleep(1.0)  # the lease taken before the crash runs out
        delivered = queue.receive(max_jobs=100, lease_seconds=30.0)
        assert sorted(d.job.id for d in delivered) == sorted(j.id for j in jobs)
        assert {d.job.id: d.attempt for d in delivered}[leased.job.id] == 2
    finally:
        store.close()
