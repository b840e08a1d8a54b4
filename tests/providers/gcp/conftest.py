"""The GCP provider against the admin API stand-in (:mod:`kidp.gcp_emulator`),
through Google's real client libraries.

Each test gets its own stand-in (it starts in milliseconds) and its own
project id. Assertions read the resources back the way an operator would:
with separate Google clients (:class:`Operator`) pointed at the stand-in,
not through the provider under test.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from tests.providers.gcp.support import Operator, new_provider

from kidp.gcp_emulator import GcpEmulator, start_gcp_emulator
from kidp.providers.gcp import GcpProvider


@pytest.fixture
def emulator() -> Iterator[GcpEmulator]:
    emulator = start_gcp_emulator(operation_polls=2)
    yield emulator
    emulator.stop()


@pytest.fixture
def api_calls() -> list[tuple[str, str]]:
    return []


@pytest.fixture
def provider(
    emulator: GcpEmulator, gcp_project: str, api_calls: list[tuple[str, str]]
) -> GcpProvider:
    return new_provider(emulator, gcp_project, api_calls)


@pytest.fixture
def operator(emulator: GcpEmulator, gcp_project: str) -> Operator:
    return Operator(emulator, gcp_project)
