"""The ARM stand-in and a provider pointed at it, through the real management clients."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kidp.arm_emulator import (
    ArmEmulatorCredential,
    RunningArmEmulator,
    seed_platform,
    start_arm_emulator,
)
from kidp.providers.azure import AzureProvider

GROUP = "kidp"


@pytest.fixture
def arm(tmp_path: Path) -> Iterator[RunningArmEmulator]:
    """A fresh stand-in per test: its resource group, Service Bus namespace and
    Container Apps environment in place; operations finish on the second read."""
    emulator = start_arm_emulator(directory=tmp_path / "arm", resource_groups=(GROUP,))
    seed_platform(emulator, GROUP)
    yield emulator
    emulator.stop()


@pytest.fixture
def api_calls() -> list[tuple[str, str]]:
    return []


@pytest.fixture
def make_provider(
    arm: RunningArmEmulator, api_calls: list[tuple[str, str]]
) -> Callable[..., AzureProvider]:
    def make(**overrides: Any) -> AzureProvider:
        options: dict[str, Any] = {
            "subscription_id": arm.subscription_id,
            "resource_group": GROUP,
            "region": arm.location,
            "credential": ArmEmulatorCredential(),
            "base_url": arm.url,
            "connection_verify": str(arm.ca_file),
            "servicebus_namespace": "kidp-events",
            "containerapps_environment": "kidp-apps",
            "on_call": lambda resource_type, operation: api_calls.append(
                (resource_type, operation)
            ),
            # No backoff sleeps between the client's own retries in tests.
            "retry_backoff": 0,
        }
        options.update(overrides)
        return AzureProvider(**options)

    return make


@pytest.fixture
def provider(make_provider: Callable[..., AzureProvider]) -> AzureProvider:
    return make_provider()
