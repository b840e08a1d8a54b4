"""Helpers for tests of the Azure adapters: faults injected into the real SDK
pipeline, at the transport, so everything above it runs as it would."""

from __future__ import annotations

import importlib.util
import json
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlencode, urlunsplit

import azure.functions as func
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


# --------------------------------------------------------------------------
# Azure Functions: the entry file loaded by path, and trigger inputs built the
# way the Python worker builds them, from the payloads in tests/events.

ROOT = Path(__file__).resolve().parents[1]
EVENTS = ROOT / "tests" / "events"


def load_function_app() -> ModuleType:
    """``azure/function_app.py`` by path, as the Python worker loads it (the
    folder is no package: it would shadow the SDK's ``azure``)."""
    spec = importlib.util.spec_from_file_location(
        "function_app", ROOT / "azure" / "function_app.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def event(name: str) -> dict[str, Any]:
    return dict(json.loads((EVENTS / name).read_text()))


class Context(func.Context):
    """The invocation context the Python worker passes to a function."""

    def __init__(self, function_name: str = "test") -> None:
        self._invocation_id = str(uuid.uuid4())
        self._function_name = function_name

    @property
    def invocation_id(self) -> str:
        return self._invocation_id

    @property
    def thread_local_storage(self) -> Any:
        return threading.local()

    @property
    def function_name(self) -> str:
        return self._function_name

    @property
    def function_directory(self) -> str:
        return str(ROOT / "azure")

    @property
    def trace_context(self) -> Any:
        return None

    @property
    def retry_context(self) -> Any:
        return None


def http_request(
    method: str,
    path: str,
    *,
    body: Any = None,
    query: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> func.HttpRequest:
    """An HTTP trigger's request (fixture ``azure_http_request.json``) for ``path``."""
    template = event("azure_http_request.json")
    url = urlunsplit(("https", template["headers"]["host"], path, urlencode(query or {}), ""))
    merged = {**template["headers"], "x-original-url": path, **(headers or {})}
    data = b"" if body is None else json.dumps(body).encode()
    if body is not None:
        merged["content-type"] = "application/json"
        merged["content-length"] = str(len(data))
    return func.HttpRequest(
        method=method,
        url=url,
        headers=merged,
        params=query or {},
        route_params={"route": path.lstrip("/")},
        body=data,
    )


def queue_message(
    body: str | None = None,
    *,
    message_id: str | None = None,
    dequeue_count: int | None = None,
    pop_receipt: str | None = None,
) -> func.QueueMessage:
    """A queue trigger's message, decoded by the SDK's own converter from the
    host's payload (fixture ``azure_queue_message.json``) with these changes."""
    from azure.functions import meta
    from azure.functions.queue import QueueMessageInConverter

    template = event("azure_queue_message.json")
    metadata = template["triggerMetadata"]
    if message_id is not None:
        metadata["Id"]["value"] = message_id
    if dequeue_count is not None:
        metadata["DequeueCount"]["value"] = str(dequeue_count)
    if pop_receipt is not None:
        metadata["PopReceipt"]["value"] = pop_receipt
    data = meta.Datum(body if body is not None else template["data"]["value"], "string")
    message: func.QueueMessage = QueueMessageInConverter.decode(
        data,
        trigger_metadata={k: meta.Datum(v["value"], v["type"]) for k, v in metadata.items()},
    )
    return message


def timer_request(*, past_due: bool = False) -> func.TimerRequest:
    """A timer trigger's request, decoded by the SDK's converter (fixture
    ``azure_timer.json``)."""
    from azure.functions import meta
    from azure.functions.timer import TimerRequestConverter

    payload = {**event("azure_timer.json"), "IsPastDue": past_due}
    payload.pop("_comment", None)
    request: func.TimerRequest = TimerRequestConverter.decode(
        meta.Datum(json.dumps(payload), "json"), trigger_metadata={}
    )
    return request
