"""Values read from a slow source (a cloud API) and kept for a while.

The accept path must not wait for a cloud: ``POST /v1/provision`` answers in
milliseconds, and a quota lookup on RDS costs three API calls. A
:class:`Refreshing` value is fetched once, served from memory while fresh,
and once stale it is still served while one background thread fetches the
next value (stale-while-revalidate), so only the very first read, or a read
after the source has been unreachable for ``max_age``, waits for the source.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class Refreshing(Generic[T]):
    """A value from ``fetch``: fresh for ``ttl`` seconds, then refreshed in the
    background while the old value is still served, up to ``max_age``
    seconds old; older than that (or never fetched), a read fetches it itself.

    Thread-safe; at most one fetch runs at a time. A failed background fetch
    keeps the old value (and is logged); a failed fetch on a read raises.
    """

    def __init__(
        self,
        fetch: Callable[[], T],
        *,
        ttl: float,
        max_age: float,
        name: str = "value",
        clock: Callable[[], float] = time.monotonic,
        background: Callable[[Callable[[], None]], None] | None = None,
    ) -> None:
        if not 0 < ttl <= max_age:
            raise ValueError("need 0 < ttl <= max_age")
        self._fetch = fetch
        self._ttl = ttl
        self._max_age = max_age
        self._name = name
        self._clock = clock
        self._background = background or _thread
        self._lock = threading.Lock()
        self._fetching = threading.Lock()
        self._value: T | None = None
        self._fetched_at: float | None = None
        self._refreshing = False

    def get(self) -> T:
        """The value: from memory when young enough, else fetched now."""
        with self._lock:
            age = None if self._fetched_at is None else self._clock() - self._fetched_at
            fresh_enough = age is not None and age < self._max_age
            refresh = fresh_enough and age is not None and age >= self._ttl
            refresh = refresh and not self._refreshing
            if refresh:
                self._refreshing = True
            value = self._value
        if not fresh_enough:
            return self._load()
        if refresh:
            # Started outside the lock: a background that runs the task at
            # once (or fails to start it) must not hold readers up.
            try:
                self._background(self._refresh)
            except BaseException:
                with self._lock:
                    self._refreshing = False
                raise
        return value  # type: ignore[return-value]

    def invalidate(self) -> None:
        """Forget the value: the next read fetches (after a change we made)."""
        with self._lock:
            self._fetched_at = None

    def _load(self) -> T:
        with self._fetching:
            with self._lock:
                # Another reader may have fetched while we waited for the fetch lock.
                if self._fetched_at is not None and self._clock() - self._fetched_at < self._ttl:
                    return self._value  # type: ignore[return-value]
            value = self._fetch()
            with self._lock:
                self._value, self._fetched_at = value, self._clock()
            return value

    def _refresh(self) -> None:
        try:
            with self._fetching:
                value = self._fetch()
            with self._lock:
                self._value, self._fetched_at = value, self._clock()
        except Exception:
            log.warning(
                "background refresh of %s failed; serving the old one", self._name, exc_info=True
            )
        finally:
            with self._lock:
                self._refreshing = False


def _thread(task: Callable[[], None]) -> None:
    threading.Thread(target=task, name="kidp-refresh", daemon=True).start()
