"""SqlJobQueue against real SQLite files and the real PostgreSQL.

The behaviour every pull queue shares runs from ``contract.py`` on a
hand-moved clock; this module adds what is particular to the SQL queue.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from tests.queues.contract import QueueContract, job
from tests.stores.sql_backends import SQL_BACKENDS, sql_url

from kidp.ports import Delivery
from kidp.queues.sql import SqlJobQueue
from kidp.stores.sql import SqlDeploymentStore, create_engine_for

LEASE = 30.0


class Clock:
    """A hand-moved clock (epoch seconds)."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(params=SQL_BACKENDS)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    eng = create_engine_for(sql_url(request, tmp_path))
    yield eng
    eng.dispose()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def queue(engine: sa.Engine, clock: Clock) -> SqlJobQueue:
    return SqlJobQueue(engine, max_deliveries=3, clock=clock)


def take(queue: SqlJobQueue, max_jobs: int = 10) -> list[Delivery]:
    return queue.receive(max_jobs=max_jobs, lease_seconds=LEASE)


class SqlHarness:
    """The contract's harness: time is the hand-moved clock, so deadlines are
    checked to a tenth of a second."""

    lease = LEASE
    tick = 10.0
    margin = 0.1
    step = 1.0

    def __init__(self, engine: sa.Engine, clock: Clock) -> None:
        self.engine = engine
        self.clock = clock
        self.queue = SqlJobQueue(engine, max_deliveries=3, clock=clock)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    def take(self, max_jobs: int = 10) -> list[Delivery]:
        return take(self.queue, max_jobs)

    def long_lease_queue(self) -> tuple[SqlJobQueue, float]:
        return SqlJobQueue(self.engine), 60.0


@pytest.fixture
def harness(engine: sa.Engine, clock: Clock) -> SqlHarness:
    return SqlHarness(engine, clock)


class TestSqlJobQueueContract(QueueContract):
    """The shared JobQueue contract, on SQLite and on PostgreSQL."""


def test_purge_done(queue: SqlJobQueue, clock: Clock) -> None:
    for n in range(3):
        queue.enqueue(job(n))
    done, kept, dead = take(queue)
    queue.ack(done)
    queue.dead_letter(dead, reason="x")
    clock.advance(100)
    queue.ack(kept)
    assert queue.purge_done(before=clock.now - 50) == 1
    assert queue.purge_done(before=datetime.fromtimestamp(clock.now + 1, UTC)) == 1
    assert [j for j, _ in queue.dead_jobs()] == [dead.job]


def test_shares_the_engine_with_the_store(tmp_path: Path) -> None:
    store = SqlDeploymentStore(f"sqlite:///{tmp_path / 'broker.db'}")
    queue = SqlJobQueue(store.engine)
    queue.enqueue(job())
    store.check()
    assert queue.pending_count() == 1
    store.close()


def test_jobs_survive_a_restart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    clock = Clock()
    engine = create_engine_for(url)
    queue = SqlJobQueue(engine, clock=clock)
    queue.enqueue(job(1))
    queue.enqueue(job(2), delay=5)
    [leased] = queue.receive(max_jobs=1, lease_seconds=LEASE)  # then "kill -9"
    engine.dispose()

    engine = create_engine_for(url)
    queue = SqlJobQueue(engine, clock=clock)
    assert queue.pending_count() == 2
    clock.advance(LEASE)
    redelivered = queue.receive(max_jobs=10, lease_seconds=LEASE)
    assert [(d.job, d.attempt) for d in redelivered] == [(leased.job, 2), (job(2), 1)]
    engine.dispose()


_RECEIVER = """
import json, sys
from kidp.queues.sql import SqlJobQueue
from kidp.stores.sql import create_engine_for
queue = SqlJobQueue(create_engine_for(sys.argv[1]))
sys.stdin.readline()  # start together
got = []
while batch := queue.receive(max_jobs=2, lease_seconds=60):
    got.extend(d.job.id for d in batch)
print(json.dumps(got))
"""


def test_concurrent_processes_never_share_a_job(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    engine = create_engine_for(url)
    queue = SqlJobQueue(engine)
    for n in range(40):
        queue.enqueue(job(n))
    engine.dispose()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RECEIVER, url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = []
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        outputs.append(json.loads(out))
    received = [job_id for got in outputs for job_id in got]
    assert len(received) == len(set(received)) == 40
