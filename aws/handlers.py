"""The broker's Lambda functions (``serverless.yml`` names them ``handlers.<name>``).

A deployment root, not a package: each entry point is the AWS edge's function
of the same name, and importing this file during Lambda's init phase builds
what that function needs (``_HANDLER`` says which), so the first request does
not pay for it. What each function does and reads: :mod:`kidp.edges.aws`.
"""

from __future__ import annotations

from kidp.edges import aws as edge

#: HTTP API (payload format 2.0) -> the broker's HTTP API.
api = edge.api
#: SQS batch -> provision, poll, delete and callback jobs (partial batch response).
worker = edge.worker
#: EventBridge schedule ``{"scan": "<name>"}`` -> drift, orphans, cost, rotation, reconcile.
scan = edge.scan
#: ``{"action": "list" | "redrive"}`` -> dead-lettered jobs and callbacks.
dlq = edge.dlq

edge.warm_up()
