"""Delayed Pub/Sub publishes on Cloud Tasks: the GCP job queue's timer.

Pub/Sub delivers a message as soon as it is published; it has no per-message
delay. A job due later (a poll in 10 s, a callback retry in 4 s, a job
retried after a throttle) is therefore handed to Cloud Tasks as a task with
``scheduleTime`` = the due time, whose HTTP target is Pub/Sub's own REST
method ``POST https://pubsub.googleapis.com/v1/{topic}:publish`` with an OAuth
token of ``service_account_email`` (scope ``pubsub``). When the task fires,
the job enters the same topic, the same subscription and the same dead-letter
policy as every other job: the jobs function only ever consumes Pub/Sub, and
no function sleeps or stays up for a delay.

Why Pub/Sub as the target and not the jobs function itself (an OIDC task to
its URL): a task that calls the function would be a second delivery path
with its own retry counter and no dead-letter topic, so the "last delivery
fails the deployment" rule would have to be kept twice.

Task names are derived from the job id and the due time: a client retry of
one ``publish_later`` call (a timeout after Cloud Tasks accepted it) is
refused as ``ALREADY_EXISTS``, which counts as success; a new schedule of
the same job is a new name. Names are hashed, as Cloud Tasks recommends
(sequential names slow its dispatch).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

from google.api_core import exceptions as api_exceptions

from kidp.errors import StoreUnavailable
from kidp.providers.gcp.endpoints import credentials_for
from kidp.providers.gcp.errors import CLIENT_ERRORS, broker_error

__all__ = ["PUBSUB_API", "PUBSUB_SCOPE", "CloudTasksDelays"]

#: Pub/Sub's REST endpoint, which the tasks call (the stand-in reroutes it).
PUBSUB_API: Final = "https://pubsub.googleapis.com"
#: The OAuth scope of the token Cloud Tasks mints for the publish call.
PUBSUB_SCOPE: Final = "https://www.googleapis.com/auth/pubsub"


class CloudTasksDelays:
    """Publishes Pub/Sub messages later through the Cloud Tasks queue ``queue``
    (``projects/<p>/locations/<l>/queues/<q>``).

    ``client`` injects a ``google.cloud.tasks_v2.CloudTasksClient``; otherwise
    one is made over REST with ``credentials`` (Application Default
    Credentials when None) and ``endpoint`` (a stand-in's URL in tests; see
    :func:`~kidp.providers.gcp.endpoints.credentials_for`).
    ``service_account_email`` is the identity Cloud Tasks calls Pub/Sub as;
    it needs ``roles/pubsub.publisher`` on the topic, and whoever creates the
    tasks needs ``roles/iam.serviceAccountUser`` on it.
    """

    def __init__(
        self,
        queue: str,
        *,
        service_account_email: str | None = None,
        client: Any = None,
        credentials: Any = None,
        endpoint: str | None = None,
    ) -> None:
        parts = queue.split("/")
        if len(parts) != 6 or parts[0::2] != ["projects", "locations", "queues"]:
            raise ValueError(f"not a Cloud Tasks queue name: {queue!r}")
        self.queue = queue
        self.service_account_email = service_account_email
        self._client = client
        self._credentials = credentials_for(endpoint, credentials)
        self._endpoint = endpoint

    def __repr__(self) -> str:
        return f"CloudTasksDelays({self.queue!r})"

    @property
    def client(self) -> Any:
        """The Cloud Tasks client, created on first use."""
        if self._client is None:
            from google.cloud import tasks_v2

            options = {"api_endpoint": self._endpoint} if self._endpoint else None
            self._client = tasks_v2.CloudTasksClient(
                credentials=self._credentials, transport="rest", client_options=options
            )
        return self._client

    def publish_later(
        self,
        topic: str,
        data: bytes,
        attributes: Mapping[str, str],
        *,
        due: float,
        key: str,
    ) -> str:
        """Publish ``data`` with ``attributes`` to ``topic`` (``projects/<p>/topics/<t>``)
        at epoch second ``due``; ``key`` names what is published (the job id).
        Returns the task's name."""
        body = {
            "messages": [
                {"data": base64.b64encode(data).decode("ascii"), "attributes": dict(attributes)}
            ]
        }
        digest = hashlib.sha256(f"{key}|{round(due * 1000)}".encode()).hexdigest()[:40]
        name = f"{self.queue}/tasks/kidp-{digest}"
        http_request: dict[str, Any] = {
            "url": f"{PUBSUB_API}/v1/{topic}:publish",
            "http_method": "POST",
            "headers": {"Content-Type": "application/json"},
            "body": json.dumps(body).encode(),
        }
        if self.service_account_email:
            http_request["oauth_token"] = {
                "service_account_email": self.service_account_email,
                "scope": PUBSUB_SCOPE,
            }
        task = {
            "name": name,
            "schedule_time": datetime.fromtimestamp(due, UTC),
            "http_request": http_request,
        }
        try:
            self.client.create_task(parent=self.queue, task=task, timeout=30.0)
        except api_exceptions.Conflict:
            # ALREADY_EXISTS (over REST only the 409 tells): this very schedule
            # was accepted by an earlier try.
            pass
        except CLIENT_ERRORS as exc:
            raise broker_error(
                exc, service="Cloud Tasks", operation="create_task", temporary=StoreUnavailable
            ) from None
        return name

    def check(self) -> None:
        """Raise ``StoreUnavailable`` unless Cloud Tasks answers for the queue."""
        try:
            self.client.get_queue(name=self.queue, timeout=10.0)
        except CLIENT_ERRORS as exc:
            error = broker_error(
                exc, service="Cloud Tasks", operation="get_queue", temporary=StoreUnavailable
            )
            raise StoreUnavailable(error.message, retry_after=30.0) from None

    def close(self) -> None:
        """Close the client's HTTP session."""
        if self._client is not None:
            transport = getattr(self._client, "transport", None)
            if transport is not None:
                transport.close()
