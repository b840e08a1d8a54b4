"""The broker's Azure Functions (Python v2 programming model).

A deployment root, not a package (no ``__init__.py``: it would shadow the
Azure SDK's ``azure`` namespace). The HTTP API is an ``AsgiFunctionApp`` around
the broker's one ASGI app; the queue, timer and dead-letter functions come
from the edge's Blueprints. What each function does and reads:
:mod:`kidp.edges.azure`.
"""

from __future__ import annotations

import azure.functions as func

from kidp.edges import azure as edge

#: Every route of the HTTP API; anonymous here, the broker checks its bearer tokens.
app = func.AsgiFunctionApp(app=edge.asgi, http_auth_level=func.AuthLevel.ANONYMOUS)
#: The job queue -> provision, poll, delete and callback jobs.
app.register_functions(edge.jobs)
#: Timers -> drift, orphans, cost, rotation and reconcile scans.
app.register_functions(edge.scans)
#: /dlq (the host's master key) -> dead-lettered jobs and callbacks.
app.register_functions(edge.operations)
