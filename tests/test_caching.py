"""Refreshing values: the accept path reads quotas from memory, not the cloud."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kidp.caching import Refreshing


class Source:
    def __init__(self) -> None:
        self.calls = 0
        self.fail = False

    def __call__(self) -> int:
        self.calls += 1
        if self.fail:
            raise ConnectionError("cloud down")
        return self.calls


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(source: Source, clock: Clock, pending: list[Callable[[], None]]) -> Refreshing[int]:
    return Refreshing(source, ttl=10, max_age=60, clock=clock, background=pending.append)


def test_the_first_read_fetches_and_reads_while_fresh_do_not() -> None:
    source, clock, pending = Source(), Clock(), []
    value = make(source, clock, pending)
    assert value.get() == 1
    clock.now = 9.9
    assert value.get() == 1
    assert source.calls == 1 and pending == []


def test_a_stale_value_is_served_while_one_background_fetch_refreshes_it() -> None:
    source, clock, pending = Source(), Clock(), []
    value = make(source, clock, pending)
    value.get()
    clock.now = 30
    assert value.get() == 1  # stale, served at once
    assert value.get() == 1
    assert len(pending) == 1  # one refresh, however many reads
    pending.pop()()
    assert value.get() == 2 and source.calls == 2


def test_a_failed_refresh_keeps_the_old_value_and_a_later_one_tries_again() -> None:
    source, clock, pending = Source(), Clock(), []
    value = make(source, clock, pending)
    value.get()
    clock.now = 30
    source.fail = True
    value.get()
    pending.pop()()  # logs, keeps 1
    assert value.get() == 1
    source.fail = False
    pending.pop()()
    assert value.get() == 3


def test_a_value_older_than_max_age_is_fetched_on_the_read_and_errors_reach_it() -> None:
    source, clock, pending = Source(), Clock(), []
    value = make(source, clock, pending)
    value.get()
    clock.now = 61
    source.fail = True
    with pytest.raises(ConnectionError):
        value.get()
    source.fail = False
    assert value.get() == 3


def test_invalidate_makes_the_next_read_fetch() -> None:
    source, clock, pending = Source(), Clock(), []
    value = make(source, clock, pending)
    value.get()
    value.invalidate()
    assert value.get() == 2


def test_ttl_must_not_exceed_max_age() -> None:
    with pytest.raises(ValueError, match="ttl"):
        Refreshing(int, ttl=10, max_age=5)


def test_a_background_that_runs_the_refresh_at_once_does_not_deadlock() -> None:
    source, clock = Source(), Clock()
    value = Refreshing(source, ttl=10, max_age=60, clock=clock, background=lambda task: task())
    value.get()
    clock.now = 30
    assert value.get() == 1  # the stale value; the refresh ran inline meanwhile
    assert value.get() == 2


def test_a_refresh_that_cannot_start_is_tried_again_at_the_next_read() -> None:
    source, clock, attempts = Source(), Clock(), []

    def refuse(task: Callable[[], None]) -> None:
        attempts.append(task)
        if len(attempts) == 1:
            raise RuntimeError("can't start new thread")

    value = Refreshing(source, ttl=10, max_age=60, clock=clock, background=refuse)
    value.get()
    clock.now = 30
    with pytest.raises(RuntimeError):
        value.get()
    value.get()
    assert len(attempts) == 2
