"""What the edges' tests share: a broker with dead-lettered callbacks for
the dlq functions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from kidp.models import DeadLetter, utcnow


@pytest.fixture
def dlq_broker(make_broker: Callable[..., Any]) -> Any:
    """A broker harness whose store holds one open (``dl-open``) and one
    resolved (``dl-resolved``) dead-lettered callback."""
    harness = make_broker()
    for letter_id, resolved in (("dl-open", None), ("dl-resolved", utcnow())):
        harness.store.add_dead_letter(
            DeadLetter(
                id=letter_id,
                event_id=f"evt-{letter_id}",
                deployment_id="deploy-" + "0" * 32,
                url="https://ci.example.com/hook",
                payload={"phase": "Ready"},
                reason="HTTP 500",
                attempts=6,
                resolved_at=resolved,
            )
        )
    return harness
