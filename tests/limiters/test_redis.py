"""RedisRateLimiter against the real Redis: one limit shared by every replica.

Each test counts under a key prefix of its own, removed afterwards. The outage
test starts a private redis-server (its own port, no persistence) so it can
kill it without touching the shared one.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from tests.conftest import PrivateServer, require_program

from kidp.emulator import free_port
from kidp.errors import StoreUnavailable
from kidp.limiters.redis import RedisRateLimiter
from kidp.ports import RateLimiter

pytestmark = pytest.mark.redis


@pytest.fixture
def replicas(redis_url: str) -> Iterator[Callable[[], RedisRateLimiter]]:
    """Makes limiters ("replicas") sharing one fresh key prefix; cleans up after."""
    prefix = f"kidp:test:{uuid.uuid4().hex[:12]}:"
    made: list[RedisRateLimiter] = []

    def make() -> RedisRateLimiter:
        limiter = RedisRateLimiter(redis_url, prefix=prefix)
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        limiter.close()
    admin = redis.Redis.from_url(redis_url)
    for key in admin.scan_iter(match=f"{prefix}*"):
        admin.delete(key)
    admin.close()


def allowed(limiter: RedisRateLimiter, n: int, *, key: str = "k", limit: int, window: float) -> int:
    return sum(limiter.hit(key, limit=limit, window_seconds=window) is None for _ in range(n))


def test_implements_the_port(replicas: Callable[[], RedisRateLimiter]) -> None:
    port: RateLimiter = replicas()
    assert port.hit("k", limit=1, window_seconds=60) is None
    replicas().check()


def test_two_replicas_share_one_limit(replicas: Callable[[], RedisRateLimiter]) -> None:
    a, b = replicas(), replicas()
    answers = [(a if n % 2 else b).hit("sub:alice", limit=10, window_seconds=60) for n in range(10)]
    assert answers == [None] * 10
    for limiter in (a, b):
        wait = limiter.hit("sub:alice", limit=10, window_seconds=60)
        assert wait is not None
        assert 59 < wait <= 60


def test_the_window_slides_and_refusals_do_not_count(
    replicas: Callable[[], RedisRateLimiter],
) -> None:
    a, b = replicas(), replicas()
    assert allowed(a, 3, limit=3, window=0.4) == 3
    wait = b.hit("k", limit=3, window_seconds=0.4)
    assert wait is not None
    assert 0 < wait <= 0.4
    assert allowed(b, 5, limit=3, window=0.4) == 0  # refused, and not counted
    time.sleep(wait + 0.02)
    assert allowed(a, 3, limit=3, window=0.4) == 3
    assert b.hit("k", limit=3, window_seconds=0.4) is not None


def test_keys_are_independent(replicas: Callable[[], RedisRateLimiter]) -> None:
    a = replicas()
    assert allowed(a, 2, key="sub:alice", limit=2, window=60) == 2
    assert a.hit("sub:alice", limit=2, window_seconds=60) is not None
    assert a.hit("sub:bob", limit=2, window_seconds=60) is None
    assert a.hit("ip:192.0.2.7", limit=2, window_seconds=60) is None


def test_a_lower_limit_applies_at_once(replicas: Callable[[], RedisRateLimiter]) -> None:
    a = replicas()
    assert allowed(a, 10, limit=10, window=60) == 10
    assert a.hit("k", limit=5, window_seconds=60) is not None
    assert a.hit("k", limit=20, window_seconds=60) is None  # a higher one: room again


def test_idle_keys_expire(replicas: Callable[[], RedisRateLimiter], redis_url: str) -> None:
    a = replicas()
    a.hit("k", limit=5, window_seconds=30)
    admin = redis.Redis.from_url(redis_url)
    try:
        ttl_ms = admin.pttl(f"{a.prefix}k")
    finally:
        admin.close()
    assert 0 < ttl_ms <= 30_000


def test_concurrent_hits_on_two_replicas_never_exceed_the_limit(
    replicas: Callable[[], RedisRateLimiter],
) -> None:
    limiters = [replicas(), replicas()]
    barrier = threading.Barrier(16)
    counts: list[int] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        barrier.wait()
        mine = allowed(limiters[n % 2], 25, key="shared", limit=100, window=60)
        with lock:
            counts.append(mine)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(counts) == 100


@pytest.mark.parametrize(("limit", "window"), [(0, 60.0), (-1, 60.0), (10, 0.0), (10, -1.0)])
def test_nonsense_arguments_are_refused(
    replicas: Callable[[], RedisRateLimiter], limit: int, window: float
) -> None:
    with pytest.raises(ValueError):
        replicas().hit("k", limit=limit, window_seconds=window)


# ------------------------------------------------------------------- Redis down


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateServer]:
    """A redis-server of this test's own, without persistence."""
    port = free_port()
    command = [
        require_program("redis-server"),
        *("--port", str(port), "--bind", "127.0.0.1"),
        *("--save", "", "--appendonly", "no", "--dir", str(tmp_path)),
    ]
    with PrivateServer(command, port=port, url=f"redis://127.0.0.1:{port}/0") as server:
        yield server


def test_redis_down_degrades_to_a_limit_per_replica_and_recovers(
    private_redis: PrivateServer, caplog: pytest.LogCaptureFixture
) -> None:
    a = RedisRateLimiter(private_redis.url, retry_after_seconds=0.3)
    b = RedisRateLimiter(private_redis.url, retry_after_seconds=0.3)
    try:
        assert allowed(a, 2, limit=4, window=60) == 2
        private_redis.kill()

        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="kidp.limiters.redis"):
            # Each replica now counts alone: its own 4, whatever the other did.
            assert allowed(a, 6, limit=4, window=60) == 4
            assert allowed(b, 6, limit=4, window=60) == 4
        assert time.monotonic() - started < 2  # a dead Redis costs milliseconds
        assert len([r for r in caplog.records if "Redis unavailable" in r.message]) == 2
        with pytest.raises(StoreUnavailable):
            a.check()

        private_redis.start()  # empty: no persistence
        time.sleep(0.35)  # past retry_after_seconds: Redis is asked again
        assert allowed(a, 3, limit=4, window=60) == 3
        assert allowed(b, 3, limit=4, window=60) == 1  # shared again
        a.check()
    finally:
        a.close()
        b.close()
