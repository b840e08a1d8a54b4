"""SQLite group commit: many threads' transactions, one durable commit, and
each transaction still all-or-nothing on its own."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from kidp.errors import StoreUnavailable
from kidp.stores.sql import GroupCommit, create_engine_for, write_engine

rows = sa.Table(
    "rows",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("writer", sa.Integer, nullable=False),
)


@pytest.fixture
def engine(tmp_path: Path) -> Any:
    engine = create_engine_for(f"sqlite:///{tmp_path / 'group.db'}")
    rows.metadata.create_all(engine)
    yield engine
    engine.dispose()


def count_commits(engine: Any) -> list[int]:
    commits: list[int] = []
    event.listen(engine, "commit", lambda conn: commits.append(1))
    return commits


def stored(engine: Any) -> list[tuple[int, int]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.select(rows).order_by(rows.c.id))]


def test_concurrent_writers_share_commits_and_each_sees_its_row_on_return(engine: Any) -> None:
    writer = write_engine(engine)
    commits = count_commits(engine)
    seen_on_return: list[bool] = []

    def insert(n: int) -> None:
        with writer.begin() as conn:
            conn.execute(sa.insert(rows).values(id=n, writer=n))
        # Durable before return: a fresh connection reads it at once.
        with engine.connect() as conn:
            seen_on_return.append(
                conn.execute(sa.select(rows.c.id).where(rows.c.id == n)).scalar() == n
            )

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(insert, range(400)))

    assert [r[0] for r in stored(engine)] == list(range(400))
    assert all(seen_on_return) and len(seen_on_return) == 400
    # Sixteen threads writing at once do not each pay for a commit.
    assert 0 < len(commits) < 400


def test_a_failing_transaction_undoes_only_its_own_writes(engine: Any) -> None:
    writer = write_engine(engine)
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def insert(n: int) -> None:
        barrier.wait()
        try:
            with writer.begin() as conn:
                conn.execute(sa.insert(rows).values(id=1000 + n, writer=n))
                if n % 2:
                    # Same primary key as an earlier row of this block: the
                    # block fails after writing, and its first row must go too.
                    conn.execute(sa.insert(rows).values(id=1000 + n, writer=n))
        except sa.exc.IntegrityError as error:
            errors.append(error)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(insert, range(8)))

    assert len(errors) == 4
    assert [r[0] for r in stored(engine)] == [1000, 1002, 1004, 1006]


def test_an_exception_in_the_block_reaches_the_caller_and_writes_nothing(engine: Any) -> None:
    writer = write_engine(engine)
    with pytest.raises(RuntimeError, match="changed my mind"), writer.begin() as conn:
        conn.execute(sa.insert(rows).values(id=1, writer=1))
        raise RuntimeError("changed my mind")
    with writer.begin() as conn:
        conn.execute(sa.insert(rows).values(id=2, writer=2))
    assert stored(engine) == [(2, 2)]


def test_a_failed_commit_fails_every_member_of_the_batch(
    engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = write_engine(engine)

    def refuse(self: Any) -> None:
        raise sa.exc.OperationalError("COMMIT", {}, Exception("disk I/O error"))

    monkeypatch.setattr(sa.engine.RootTransaction, "commit", refuse)
    with pytest.raises(StoreUnavailable, match="did not commit"), writer.begin() as conn:
        conn.execute(sa.insert(rows).values(id=1, writer=1))
    monkeypatch.undo()
    assert stored(engine) == []
    with writer.begin() as conn:  # the next batch starts clean
        conn.execute(sa.insert(rows).values(id=2, writer=2))
    assert stored(engine) == [(2, 2)]


def test_writers_on_one_file_share_one_group(engine: Any) -> None:
    a, b = write_engine(engine), write_engine(engine)
    assert isinstance(a._group, GroupCommit) and a._group is b._group


def test_a_failed_commit_fails_every_member_and_no_acknowledged_write_is_lost(
    engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = write_engine(engine)
    real = sa.engine.RootTransaction.commit
    refused = threading.Event()

    def refuse_once(self: Any) -> None:
        if not refused.is_set():
            refused.set()
            raise sa.exc.OperationalError("COMMIT", {}, Exception("disk I/O error"))
        real(self)

    monkeypatch.setattr(sa.engine.RootTransaction, "commit", refuse_once)
    barrier = threading.Barrier(8)
    outcome: dict[int, str] = {}

    def member(n: int) -> None:
        barrier.wait()
        try:
            with writer.begin() as conn:
                conn.execute(sa.insert(rows).values(id=n, writer=n))
            outcome[n] = "ok"
        except StoreUnavailable:
            outcome[n] = "refused"

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(member, range(8)))

    acknowledged = {n for n, result in outcome.items() if result == "ok"}
    assert "refused" in outcome.values()
    assert acknowledged == {r[0] for r in stored(engine)}  # told the truth, each of them


def test_a_duplicate_against_a_row_in_the_same_batch_is_a_duplicate_not_an_error(
    tmp_path: Path,
) -> None:
    # A client and its retry race (same X-Request-ID) while other writers keep
    # batches open: the loser must see the winner (DuplicateDeployment), never
    # the raw constraint error it hit on the winner's still uncommitted row.
    from tests.stores.conftest import new_deployment

    from kidp.errors import DuplicateDeployment
    from kidp.stores.sql import SqlDeploymentStore

    store = SqlDeploymentStore(f"sqlite:///{tmp_path / 'store.db'}")
    stop = threading.Event()
    counter = iter(range(10**9))

    def background() -> None:
        while not stop.is_set():
            store.create(new_deployment(f"bg-{next(counter)}"))

    writers = [threading.Thread(target=background) for _ in range(8)]
    for thread in writers:
        thread.start()
    results: list[str] = []
    try:
        for race in range(150):
            barrier = threading.Barrier(3)

            def attempt(race: int = race, barrier: threading.Barrier = barrier) -> None:
                barrier.wait()
                try:
                    store.create(new_deployment(f"pair-{race}", request_id=f"req-{race}"))
                    results.append("created")
                except DuplicateDeployment:
                    results.append("duplicate")
                except Exception as error:
                    results.append(type(error).__name__)

            racers = [threading.Thread(target=attempt) for _ in range(3)]
            for thread in racers:
                thread.start()
            for thread in racers:
                thread.join()
    finally:
        stop.set()
        for thread in writers:
            thread.join()
        store.close()
    assert results.count("created") == 150
    assert results.count("duplicate") == 300, {
        r for r in results if r not in ("created", "duplicate")
    }


def test_a_write_inside_a_write_is_refused_instead_of_waiting_for_itself(engine: Any) -> None:
    writer = write_engine(engine)
    with pytest.raises(RuntimeError, match="inside another"), writer.begin(), writer.begin():
        pass
    with writer.begin() as conn:  # the group is usable afterwards
        conn.execute(sa.insert(rows).values(id=1, writer=1))
    assert stored(engine) == [(1, 1)]


def test_writers_of_another_process_wait_on_the_file_lock_and_go_the_moment_it_frees(
    engine: Any,
) -> None:
    import fcntl
    import os

    writer = write_engine(engine)
    # What another process's writer holds while its transaction runs.
    other = os.open(f"{engine.url.database}.writer", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(other, fcntl.LOCK_EX)
    done = threading.Event()

    def write() -> None:
        with writer.begin() as conn:
            conn.execute(sa.insert(rows).values(id=1, writer=1))
        done.set()

    thread = threading.Thread(target=write)
    thread.start()
    try:
        assert not done.wait(0.3)  # waits for the other process
    finally:
        fcntl.flock(other, fcntl.LOCK_UN)
        os.close(other)
    assert done.wait(5)
    thread.join()
    assert stored(engine) == [(1, 1)]
