"""Helpers for tests of the Azure adapters: faults injected into the real SDK
pipeline, at the transport, so everything above it runs as it would."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from azure.core.exceptions import ServiceRequestError
from azure.core.pipeline.transport import HttpRequest, RequestsTransport


class FaultyTransport(RequestsTransport):
    """azure-core's requests transport, except that requests ``fails(request)``
    picks never leave the process (``ServiceRequestError``, as when the
    network is down or the process dies before sending). ``failed`` lists the
    URLs it refused."""

    def __init__(self, fails: Callable[[HttpRequest], bool] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fails: Callable[[HttpRequest], bool] = fails or (lambda _: False)
        self.failed: list[str] = []

    def send(self, request: Any, **kwargs: Any) -> Any:
        if self.fails(request):
            self.failed.append(f"{request.method} {request.url}")
            raise ServiceRequestError("injected: the request never left")
        return super().send(request, **kwargs)


def is_batch(request: HttpRequest) -> bool:
    """A Table Storage entity group transaction."""
    return "$batch" in request.url


def batches_after(count: int) -> Callable[[HttpRequest], bool]:
    """Refuse every entity group transaction after the first ``count``."""
    seen = [0]

    def fails(request: HttpRequest) -> bool:
        if not is_batch(request):
            return False
        seen[0] += 1
        return seen[0] > count

    return fails
