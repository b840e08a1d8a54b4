"""kidp.secrets.base: the steps every remote secret store shares, with stub
reads and creates standing in for a store's API."""

from __future__ import annotations

import pytest

from kidp.errors import ProvisioningFailed, StoreUnavailable
from kidp.secrets.base import check_reachable, ensure_once


class Exists(Exception):
    """The store's "already exists" answer."""


def test_an_existing_secret_is_read_never_created() -> None:
    def create() -> str:
        raise AssertionError("created although it exists")

    assert ensure_once(lambda: "theirs", create, lost_race=Exists, what="s") == "theirs"


def test_a_missing_secret_is_created() -> None:
    assert ensure_once(lambda: None, lambda: "ours", lost_race=Exists, what="s") == "ours"


def test_a_lost_race_returns_the_winners_value() -> None:
    reads = iter([None, "winner"])

    def create() -> str:
        raise Exists

    assert ensure_once(lambda: next(reads), create, lost_race=Exists, what="s") == "winner"


def test_a_winner_not_yet_readable_is_temporary_and_names_only_the_secret() -> None:
    def create() -> str:
        raise Exists("password=hunter2")

    with pytest.raises(StoreUnavailable) as raised:
        ensure_once(lambda: None, create, lost_race=Exists, what="secret kidp/a/b")
    assert raised.value.message == "secret kidp/a/b exists but cannot be read yet"
    assert raised.value.retry_after == 5.0


def test_other_create_errors_are_not_mistaken_for_a_lost_race() -> None:
    def create() -> str:
        raise ProvisioningFailed("refused")

    with pytest.raises(ProvisioningFailed):
        ensure_once(lambda: None, create, lost_race=Exists, what="s")


def test_a_refused_health_probe_means_the_store_is_unavailable() -> None:
    def probe() -> None:
        raise ProvisioningFailed("AccessDenied")

    with pytest.raises(StoreUnavailable) as raised:
        check_reachable(probe)
    assert raised.value.message == "AccessDenied"
    assert raised.value.retry_after == 30.0


def test_an_unreachable_store_stays_unavailable_and_a_good_probe_passes() -> None:
    def down() -> None:
        raise StoreUnavailable("timeout", retry_after=1.0)

    with pytest.raises(StoreUnavailable) as raised:
        check_reachable(down)
    assert raised.value.retry_after == 1.0
    check_reachable(lambda: None)
