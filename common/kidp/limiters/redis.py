"""A rate limit that holds across replicas: counters in Redis (``KIDP_REDIS_URL``).

Same algorithm and answers as :class:`kidp.limits.InMemoryRateLimiter`, a
sliding-window log: a key may make ``limit`` requests in any
``window_seconds`` long interval, refused requests are not counted, and the
answer is the exact wait until the oldest counted request leaves the window.
Each key is one sorted set of request times, trimmed to the newest ``limit``
entries and expiring with its window. One Lua script does the whole
check-and-count, so concurrent requests on any number of replicas can never
pass more than ``limit``; times come from the Redis server's clock, so
replicas whose clocks disagree still share one window.

**When Redis is down the limiter degrades, it does not refuse.** A cache
outage must not turn every API call into a 503, and fail-open would drop the
protection entirely; so each replica falls back to its own in-memory limiter
(the limit then holds per replica rather than in total), logs one warning per
outage, and tries Redis again after ``retry_after_seconds``. Redis calls use
short timeouts and no client-side retry loop: the API calls ``hit`` on its
event loop, so a dead Redis must cost milliseconds, not seconds.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable

import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry

from kidp.errors import StoreUnavailable
from kidp.limits import InMemoryRateLimiter
from kidp.ports import RateLimiter

__all__ = ["RedisRateLimiter"]

log = logging.getLogger(__name__)

# KEYS[1]: the key's sorted set. ARGV: window (µs), limit, a unique member.
# Returns -1 when the request is counted, else the wait in µs (>= 1).
# Scores are the server's clock in µs (exact in a double until 2255).
_SLIDING_WINDOW = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000000 + tonumber(now_parts[2])
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
if count > limit then
  -- Only the newest ``limit`` requests can decide an answer (after a lower
  -- limit is configured, say); the rest is dead weight.
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, count - limit - 1)
  count = limit
end
if count >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  local wait = tonumber(oldest[2]) + window - now
  if wait < 1 then wait = 1 end
  return wait
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000))
return -1
"""

#: Failures that mean "Redis cannot answer now" (the client's timeouts and
#: connection errors, a loading or read-only replica, a busy script).
_OUTAGES = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    OSError,
)


class RedisRateLimiter:
    """``RateLimiter`` on Redis, for a limit shared by every replica.

    ``client`` replaces the client built from ``url`` (tests hand in their own).
    ``timeout`` bounds every Redis call; after a failure the in-memory
    ``fallback`` answers for ``retry_after_seconds`` before Redis is tried again.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "kidp:ratelimit:",
        client: redis.Redis | None = None,
        timeout: float = 0.25,
        retry_after_seconds: float = 5.0,
        fallback: RateLimiter | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout <= 0 or retry_after_seconds < 0:
            raise ValueError("timeout must be positive and retry_after_seconds not negative")
        self._owns_client = client is None
        self._client = client or redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # One immediate retry replaces a pooled connection that died with
            # a Redis restart; more would only stretch an outage.
            retry=Retry(NoBackoff(), 1),
            health_check_interval=30,
        )
        self.prefix = prefix
        self._script = self._client.register_script(_SLIDING_WINDOW)
        self._fallback = fallback or InMemoryRateLimiter()
        self._retry_after = retry_after_seconds
        self._clock = clock
        self._down_until: float | None = None
        self._lock = threading.Lock()
        # Members must be unique per request; pid + counter is, without randomness.
        self._member_prefix = f"{os.getpid()}:{id(self):x}:"
        self._counter = itertools.count()

    def hit(self, key: str, *, limit: int, window_seconds: float) -> float | None:
        """Count one request for ``key``: None if allowed, else the seconds until
        a request would be allowed (always > 0)."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        if window_seconds <= 0:
            raise ValueError("window_seconds must be positive")
        if self._in_outage():
            return self._fallback.hit(key, limit=limit, window_seconds=window_seconds)
        member = f"{self._member_prefix}{next(self._counter)}"
        window_us = max(1, round(window_seconds * 1_000_000))
        try:
            answer = self._script(keys=[self.prefix + key], args=[window_us, limit, member])
        except _OUTAGES as exc:
            self._enter_outage(exc)
            return self._fallback.hit(key, limit=limit, window_seconds=window_seconds)
        self._leave_outage()
        wait_us = int(answer)
        return None if wait_us < 0 else wait_us / 1_000_000

    def check(self) -> None:
        """Raise ``StoreUnavailable`` unless Redis answers a PING. For operators:
        the API itself keeps serving on the fallback while Redis is down."""
        try:
            self._client.ping()
        except _OUTAGES as exc:
            raise StoreUnavailable(f"Redis is unavailable ({type(exc).__name__})") from exc

    def close(self) -> None:
        """Release the connection pool if this limiter created the client."""
        if self._owns_client:
            self._client.close()

    # ---------------------------------------------------------------- outage

    def _in_outage(self) -> bool:
        with self._lock:
            return self._down_until is not None and self._clock() < self._down_until

    def _enter_outage(self, exc: Exception) -> None:
        with self._lock:
            first = self._down_until is None
            self._down_until = self._clock() + self._retry_after
        if first:
            log.warning(
                "Redis unavailable: rate limits now hold per replica until it is back",
                extra={"error": type(exc).__name__},
            )

    def _leave_outage(self) -> None:
        if self._down_until is None:
            return  # the common case, without taking the lock
        with self._lock:
            was_down, self._down_until = self._down_until is not None, None
        if was_down:
            log.info("Redis is back: rate limits are shared again")
