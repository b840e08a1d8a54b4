"""Request rate limiting for one broker process.

:class:`InMemoryRateLimiter` implements :class:`kidp.ports.RateLimiter` with a
sliding-window log: a key may make ``limit`` requests in any ``window_seconds``
long interval, exactly, which is what "100 requests per minute" promises a
caller. The API decides the key (the token's subject, or the source address
when there is no valid token); this module only counts.

State lives in the process, so several replicas each allow the full limit; a
deployment that needs one shared budget plugs a shared limiter into the same
port.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["InMemoryRateLimiter"]


@dataclass
class _Log:
    """The times of one key's requests still inside its window, oldest first."""

    window: float
    hits: deque[float] = field(default_factory=deque)


class InMemoryRateLimiter:
    """A thread-safe sliding-window-log limiter with bounded memory.

    Memory stays bounded in two ways: a key keeps at most ``limit`` timestamps,
    and keys are kept in least-recently-used order so idle ones are dropped as
    soon as their window has passed. ``max_keys`` caps the number of keys when
    many distinct callers are active at once (for example a flood from many
    source addresses); the least recently seen key is forgotten first.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_keys: int = 100_000,
    ) -> None:
        """``clock`` returns seconds and must not go backwards."""
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self._clock = clock
        self._max_keys = max_keys
        self._logs: OrderedDict[str, _Log] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """How many keys are currently tracked."""
        with self._lock:
            return len(self._logs)

    def hit(self, key: str, *, limit: int, window_seconds: float) -> float | None:
        """Count one request for ``key``: None if allowed, else the seconds until
        a request would be allowed (always > 0). Refused requests are not
        counted, so a caller that keeps retrying does not extend its own wait."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        if window_seconds <= 0:
            raise ValueError("window_seconds must be positive")
        with self._lock:
            now = self._clock()
            self._evict_idle(now)
            log = self._logs.get(key)
            if log is None:
                log = _Log(window=window_seconds)
                self._logs[key] = log
                if len(self._logs) > self._max_keys:
                    self._logs.popitem(last=False)
            else:
                self._logs.move_to_end(key)
                log.window = window_seconds
            hits = log.hits
            horizon = now - window_seconds
            while hits and hits[0] <= horizon:
                hits.popleft()
            # Only the newest ``limit`` requests can decide a future answer
            # (after a lower limit is configured, say); older ones are dead weight.
            while len(hits) > limit:
                hits.popleft()
            if len(hits) >= limit:
                return hits[0] + window_seconds - now
            hits.append(now)
            return None

    def _evict_idle(self, now: float) -> None:
        # Keys are in least-recently-used order, so idle keys gather at the
        # front; stopping at the first active one keeps this O(evicted). A key
        # with a longer window further back is only freed later, never wrongly.
        while self._logs:
            key, log = next(iter(self._logs.items()))
            if log.hits and log.hits[-1] > now - log.window:
                return
            del self._logs[key]
