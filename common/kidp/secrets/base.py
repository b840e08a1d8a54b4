"""What every remote secret store does the same way around its own API.

The :class:`kidp.ports.SecretStore` contract asks ``ensure`` never to
regenerate a value, including when two workers provision the same deployment
at once, and ``check`` to report an unreachable store as a temporary error.
Each adapter supplies its store's read, create and probe; the steps around
them are here, once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from kidp.errors import BrokerError, StoreUnavailable

T = TypeVar("T")


def ensure_once(
    read: Callable[[], T | None],
    create: Callable[[], T],
    *,
    lost_race: type[Exception] | tuple[type[Exception], ...],
    what: str,
) -> T:
    """``read()`` if it finds the secret, else ``create()``.

    ``create`` raises ``lost_race`` when the secret appeared since the read
    (another worker made it); the winner's value is then read and returned,
    never ours, so both workers hand out the same credentials. ``what`` names
    the secret in the ``StoreUnavailable`` raised when the winner cannot be read
    yet.
    """
    existing = read()
    if existing is not None:
        return existing
    try:
        return create()
    except lost_race:
        winner = read()
        if winner is None:
            raise StoreUnavailable(
                f"{what} exists but cannot be read yet", retry_after=5.0
            ) from None
        return winner


def check_reachable(probe: Callable[[], object]) -> None:
    """Run ``probe`` (one cheap call to the store); any broker error it raises
    becomes ``StoreUnavailable``: a health check that fails means the store
    cannot be used now, whatever the store called the refusal."""
    try:
        probe()
    except StoreUnavailable:
        raise
    except BrokerError as exc:
        raise StoreUnavailable(exc.message, retry_after=30.0) from None
