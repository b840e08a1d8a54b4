"""The in-memory rate limiter: 100 requests per minute per key, exactly."""

from __future__ import annotations

import math
import threading
import time

import pytest

from kidp.limits import InMemoryRateLimiter

LIMIT = 100
WINDOW = 60.0


class FakeClock:
    """A settable monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def limiter(clock: FakeClock) -> InMemoryRateLimiter:
    return InMemoryRateLimiter(clock)


def hit(limiter: InMemoryRateLimiter, key: str = "alice") -> float | None:
    return limiter.hit(key, limit=LIMIT, window_seconds=WINDOW)


def test_hundred_requests_pass_then_the_next_must_wait(limiter: InMemoryRateLimiter) -> None:
    assert [hit(limiter) for _ in range(LIMIT)] == [None] * LIMIT

    wait = hit(limiter)

    assert wait is not None
    assert wait == pytest.approx(WINDOW)
    assert math.ceil(wait) >= 1


def test_the_window_slides(limiter: InMemoryRateLimiter, clock: FakeClock) -> None:
    for _ in range(50):
        assert hit(limiter) is None
    clock.now += 30
    for _ in range(50):
        assert hit(limiter) is None

    clock.now += 15  # 45 s after the first burst: all 100 still count
    assert hit(limiter) == pytest.approx(15)

    clock.now += 15  # the first 50 have left the window, the last 50 have not
    assert [hit(limiter) for _ in range(50)] == [None] * 50
    assert hit(limiter) == pytest.approx(30)


def test_wait_is_exact_and_positive(limiter: InMemoryRateLimiter, clock: FakeClock) -> None:
    for _ in range(LIMIT):
        hit(limiter)
    clock.now += 59.5
    wait = hit(limiter)
    assert wait is not None
    assert wait == pytest.approx(0.5)
    assert wait > 0
    clock.now += 0.5
    assert hit(limiter) is None


def test_refused_requests_do_not_extend_the_wait(
    limiter: InMemoryRateLimiter, clock: FakeClock
) -> None:
    for _ in range(LIMIT):
        hit(limiter)
    for _ in range(59):
        clock.now += 1
        assert hit(limiter) is not None
    clock.now += 1
    assert hit(limiter) is None


def test_keys_are_independent(limiter: InMemoryRateLimiter) -> None:
    for _ in range(LIMIT):
        hit(limiter, "subject:alice")
    assert hit(limiter, "subject:alice") is not None

    assert hit(limiter, "subject:bob") is None
    assert hit(limiter, "ip:192.0.2.7") is None


def test_concurrent_hits_never_exceed_the_limit() -> None:
    limiter = InMemoryRateLimiter()  # the real monotonic clock
    threads_count, per_thread = 16, 50
    barrier = threading.Barrier(threads_count)
    allowed: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        mine = sum(1 for _ in range(per_thread) if hit(limiter, "shared") is None)
        with lock:
            allowed.append(mine)

    threads = [threading.Thread(target=worker) for _ in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sum(allowed) == LIMIT


def test_idle_keys_are_forgotten(limiter: InMemoryRateLimiter, clock: FakeClock) -> None:
    for i in range(1000):
        limiter.hit(f"ip:{i}", limit=LIMIT, window_seconds=WINDOW)
    assert len(limiter) == 1000

    clock.now += WINDOW
    hit(limiter, "someone-new")

    assert len(limiter) == 1


def test_key_count_is_capped(clock: FakeClock) -> None:
    limiter = InMemoryRateLimiter(clock, max_keys=10)
    for i in range(25):
        limiter.hit(f"ip:{i}", limit=LIMIT, window_seconds=WINDOW)
    assert len(limiter) == 10
    # The most recent keys are the ones kept.
    for _ in range(LIMIT - 1):
        limiter.hit("ip:24", limit=LIMIT, window_seconds=WINDOW)
    assert limiter.hit("ip:24", limit=LIMIT, window_seconds=WINDOW) is not None


def test_a_lower_limit_applies_at_once(limiter: InMemoryRateLimiter, clock: FakeClock) -> None:
    for _ in range(LIMIT):
        hit(limiter)
        clock.now += 0.1
    wait = limiter.hit("alice", limit=10, window_seconds=WINDOW)
    # The 10th newest request was made 1 s ago; once it leaves the window, 9 remain.
    assert wait == pytest.approx(WINDOW - 1.0)


@pytest.mark.parametrize(("limit", "window"), [(0, 60.0), (-1, 60.0), (10, 0.0), (10, -1.0)])
def test_nonsense_arguments_are_refused(
    limiter: InMemoryRateLimiter, limit: int, window: float
) -> None:
    with pytest.raises(ValueError):
        limiter.hit("k", limit=limit, window_seconds=window)


def test_real_clock_smoke() -> None:
    limiter = InMemoryRateLimiter()
    started = time.monotonic()
    assert limiter.hit("k", limit=1, window_seconds=0.2) is None
    wait = limiter.hit("k", limit=1, window_seconds=0.2)
    assert wait is not None
    assert 0 < wait <= 0.2
    time.sleep(max(0.0, started + 0.25 - time.monotonic()))
    assert limiter.hit("k", limit=1, window_seconds=0.2) is None
