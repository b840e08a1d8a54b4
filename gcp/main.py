"""The broker's Cloud Functions (2nd gen); ``infra/gcp`` deploys each by the
name of its entry point.

A deployment root, not a package: each function is declared here (the
framework finds it by name in this file) and is one call into the GCP edge.
Importing this file while an instance starts builds what its function needs
(``FUNCTION_TARGET`` says which), so the first request does not pay for it.
What each function does and reads: :mod:`kidp.edges.gcp`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kidp.edges import gcp as edge

if TYPE_CHECKING:
    import flask
    from cloudevents.http.event import CloudEvent
    from starlette.requests import Request


@edge.asgi_http_function
def api(request: Request) -> Any:
    """HTTP -> the broker's ASGI app (every route of the API)."""
    return edge.api_response()


@edge.cloudevent_function
def jobs(event: CloudEvent) -> None:
    """Pub/Sub ``messagePublished`` -> a provision, poll, delete or callback job."""
    edge.work_event(event["type"], event.data, push_body=edge.raw_push_body())


@edge.http_function
def scan(request: flask.Request) -> tuple[dict[str, Any], int]:
    """Cloud Scheduler ``{"scan": "<name>"}`` -> drift, orphans, cost, rotation, reconcile."""
    return edge.scan_response(request.get_json(silent=True), dict(request.headers))


@edge.http_function
def dlq(request: flask.Request) -> tuple[dict[str, Any], int]:
    """``{"action": "list" | "redrive"}`` -> dead-lettered jobs and callbacks."""
    return edge.dlq_response(
        request.method, request.get_json(silent=True), dict(request.headers), request.args
    )


edge.warm_up()
