"""What the tests of the ``serve --emulate`` starters (``start_azure``,
``start_gcp``) check alike: that an emulated cloud's environment and settings
build a broker that is healthy and offers every resource type.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from kidp.emulator import EmulatedCloud
from kidp.models import ResourceType
from kidp.service import BrokerService
from kidp.settings import Settings


def emulated_settings(
    cloud: EmulatedCloud, monkeypatch: pytest.MonkeyPatch, **fields: Any
) -> Settings:
    """The broker's settings on ``cloud``, with ``fields`` added, once its
    environment is set (``monkeypatch`` restores it after the test)."""
    for name, value in cloud.environ.items():
        assert value is not None
        monkeypatch.setenv(name, value)
    return Settings(**fields, **cloud.settings)


@contextlib.contextmanager
def healthy_broker(settings: Settings) -> Iterator[BrokerService]:
    """The broker built from ``settings``, checked healthy and offering every
    resource type; closed on leaving."""
    from kidp.bootstrap import build

    broker = build(settings)
    try:
        service = broker.service
        ok, health = service.health()
        assert ok, health
        assert set(service.provider.supported()) == set(ResourceType)
        yield service
    finally:
        broker.close()
