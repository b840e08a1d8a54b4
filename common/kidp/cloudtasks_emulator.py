"""A local stand-in for the Cloud Tasks API (v2, REST), which has no emulator.

The broker's delayed jobs on GCP are Cloud Tasks tasks with a
``scheduleTime`` whose HTTP target publishes the job to the Pub/Sub topic
(:mod:`kidp.queues.cloudtasks`). This server answers the REST methods the
``google-cloud-tasks`` client sends for that (queues: create, get; tasks:
create, get, list, delete) and, like Cloud Tasks, makes each task's HTTP
request once it is due, retrying a failed dispatch until it succeeds or runs
out of attempts.

What it simplifies: one retry delay instead of the queue's retry config,
no rate limits, no IAM; an OAuth or OIDC token is a fixed placeholder
(``Bearer emulated-oauth-token``). A task's target host can be rerouted
(``routes={"pubsub.googleapis.com": "http://127.0.0.1:8085"}``), which is how
a task that publishes to ``https://pubsub.googleapis.com`` reaches the Pub/Sub
emulator: the adapter under test always writes the real URL.
"""

from __future__ import annotations

import base64
import heapq
import itertools
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from kidp.gcp_standin import ApiError, GoogleApiServer, Request, parse_timestamp, timestamp

log = logging.getLogger(__name__)

_QUEUE = r"projects/[^/]+/locations/[^/]+/queues/[^/:]+"
_TASK_ID = r"[A-Za-z0-9_-]{1,500}"
#: HttpMethod as the REST client sends it (``enum-encoding=int``) or by name.
_METHODS = {0: "POST", 1: "POST", 2: "GET", 3: "HEAD", 4: "PUT", 5: "DELETE", 6: "PATCH"}
_METHODS_BY_NAME = {"POST", "GET", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS"}


@dataclass
class _Task:
    name: str
    due: float
    request: dict[str, Any]
    created: float
    dispatches: int = 0
    responses: int = 0
    last_status: int | None = None

    def view(self) -> dict[str, Any]:
        http = {k: v for k, v in self.request.items() if k != "body"}  # BASIC view
        return {
            "name": self.name,
            "scheduleTime": timestamp(datetime.fromtimestamp(self.due, UTC)),
            "createTime": timestamp(datetime.fromtimestamp(self.created, UTC)),
            "httpRequest": http,
            "dispatchCount": self.dispatches,
            "responseCount": self.responses,
        }


class CloudTasksEmulator(GoogleApiServer):
    """The running stand-in: ``url`` for ``client_options``, ``stop()`` to end it."""

    service = "cloudtasks"

    def __init__(
        self,
        *,
        routes: Mapping[str, str] | None = None,
        retry_seconds: float = 1.0,
        max_attempts: int = 100,
    ) -> None:
        super().__init__()
        self.routes = dict(routes or {})
        self.retry_seconds = retry_seconds
        self.max_attempts = max_attempts
        #: Seconds this stand-in's clock runs ahead of the real one (see advance()).
        self.offset = 0.0
        self.queues: dict[str, dict[str, Any]] = {}
        self.tasks: dict[str, _Task] = {}
        #: Names of finished tasks: Cloud Tasks refuses to reuse a name for a while.
        self.tombstones: set[str] = set()
        #: (task name, status or error) of every dispatch, in order.
        self.dispatched: list[tuple[str, int | str]] = []
        #: Every task created, with the delay it was created with (seconds).
        self.created: list[tuple[str, float]] = []
        self._heap: list[tuple[float, int, str]] = []
        self._order = itertools.count()
        self._wake = threading.Condition(self.lock)
        self._running = True
        self._dispatcher = threading.Thread(
            target=self._dispatch_loop, name="cloudtasks-dispatch", daemon=True
        )
        self.route("POST", r"/v2/(projects/[^/]+/locations/[^/]+)/queues", self._create_queue)
        self.route("GET", rf"/v2/({_QUEUE})", self._get_queue)
        self.route("POST", rf"/v2/({_QUEUE})/tasks", self._create_task)
        self.route("GET", rf"/v2/({_QUEUE})/tasks", self._list_tasks)
        self.route("GET", rf"/v2/({_QUEUE}/tasks/{_TASK_ID})", self._get_task)
        self.route("DELETE", rf"/v2/({_QUEUE}/tasks/{_TASK_ID})", self._delete_task)

    def start(self) -> None:
        super().start()
        self._dispatcher.start()

    def stop(self) -> None:
        with self._wake:
            self._running = False
            self._wake.notify_all()
        super().stop()
        self._dispatcher.join(timeout=5)

    def now(self) -> float:
        """Epoch seconds as this stand-in sees them."""
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass inside the stand-in (and only there): tasks due
        by then are dispatched at once. Tests use it as they move SQS's clock."""
        with self._wake:
            self.offset += seconds
            self._wake.notify_all()

    def add_queue(self, name: str) -> None:
        """Create the queue ``projects/<p>/locations/<l>/queues/<q>`` (as Terraform would)."""
        with self.lock:
            self.queues.setdefault(name, {"name": name, "state": 1})

    def pending(self, queue: str | None = None) -> list[dict[str, Any]]:
        """Tasks not dispatched successfully yet, soonest first."""
        with self.lock:
            found = [t for t in self.tasks.values() if queue is None or t.name.startswith(queue)]
            return [t.view() for t in sorted(found, key=lambda t: t.due)]

    # ------------------------------------------------------------------ API

    def _create_queue(self, request: Request) -> tuple[int, Any]:
        name = str(request.body.get("name", ""))
        if not name.startswith(request.match.group(1) + "/queues/"):
            raise ApiError(400, "queue name must be under its parent")
        with self.lock:
            if name in self.queues:
                raise ApiError(409, f"queue {name} already exists")
            self.queues[name] = {"name": name, "state": 1}
            return 200, self.queues[name]

    def _queue(self, name: str) -> dict[str, Any]:
        queue = self.queues.get(name)
        if queue is None:
            raise ApiError(404, f"queue {name} does not exist")
        return queue

    def _get_queue(self, request: Request) -> tuple[int, Any]:
        with self.lock:
            return 200, self._queue(request.match.group(1))

    def _create_task(self, request: Request) -> tuple[int, Any]:
        queue_name = request.match.group(1)
        spec = request.body.get("task") or {}
        http = spec.get("httpRequest")
        if not isinstance(http, dict) or not http.get("url"):
            raise ApiError(400, "only HTTP tasks with a url are supported here")
        if not str(http["url"]).startswith(("https://", "http://")):
            raise ApiError(400, "the task's url must be http(s)")
        with self.lock:
            self._queue(queue_name)
            self._fault()
            name = spec.get("name") or f"{queue_name}/tasks/{next(self._order)}{time.time_ns()}"
            if not name.startswith(queue_name + "/tasks/"):
                raise ApiError(400, "task name must be under its queue")
            if name in self.tasks or name in self.tombstones:
                raise ApiError(409, f"task {name} already exists")
            due = (
                parse_timestamp(spec["scheduleTime"]).timestamp()
                if spec.get("scheduleTime")
                else self.now()
            )
            task = _Task(name=name, due=due, request=dict(http), created=time.time())
            self.tasks[name] = task
            self.created.append((name, due - time.time()))
            heapq.heappush(self._heap, (due, next(self._order), name))
            self._wake.notify_all()
            return 200, task.view()

    def _list_tasks(self, request: Request) -> tuple[int, Any]:
        queue_name = request.match.group(1)
        with self.lock:
            self._queue(queue_name)
            return 200, {"tasks": self.pending(queue_name + "/")}

    def _get_task(self, request: Request) -> tuple[int, Any]:
        with self.lock:
            task = self.tasks.get(request.match.group(1))
            if task is None:
                raise ApiError(404, "task does not exist")
            return 200, task.view()

    def _delete_task(self, request: Request) -> tuple[int, Any]:
        name = request.match.group(1)
        with self.lock:
            if self.tasks.pop(name, None) is None:
                raise ApiError(404, "task does not exist")
            self.tombstones.add(name)
            return 200, {}

    # ------------------------------------------------------------- dispatch

    def _dispatch_loop(self) -> None:
        while True:
            with self._wake:
                while self._running and (not self._heap or self._heap[0][0] > self.now()):
                    timeout = self._heap[0][0] - self.now() if self._heap else None
                    self._wake.wait(timeout=timeout)
                if not self._running:
                    return
                _, _, name = heapq.heappop(self._heap)
                task = self.tasks.get(name)
                if task is None:
                    continue  # deleted meanwhile
                task.dispatches += 1
            status = self._send(task)
            with self._wake:
                self.dispatched.append((name, status))
                if isinstance(status, int):
                    task.responses += 1
                    task.last_status = status
                if isinstance(status, int) and 200 <= status < 300:
                    self.tasks.pop(name, None)
                    self.tombstones.add(name)
                elif task.dispatches >= self.max_attempts:
                    log.warning("task %s dropped after %d attempts", name, task.dispatches)
                    self.tasks.pop(name, None)
                    self.tombstones.add(name)
                elif name in self.tasks:
                    task.due = self.now() + self.retry_seconds
                    heapq.heappush(self._heap, (task.due, next(self._order), name))

    def _send(self, task: _Task) -> int | str:
        http = task.request
        method = http.get("httpMethod", "POST")
        if isinstance(method, int):
            method = _METHODS.get(method, "POST")
        elif method not in _METHODS_BY_NAME:
            method = "POST"
        headers = {str(k): str(v) for k, v in (http.get("headers") or {}).items()}
        headers.update(
            {
                "User-Agent": "Google-Cloud-Tasks",
                "X-CloudTasks-QueueName": task.name.split("/")[5],
                "X-CloudTasks-TaskName": task.name.rsplit("/", 1)[1],
                "X-CloudTasks-TaskRetryCount": str(task.dispatches - 1),
                "X-CloudTasks-TaskExecutionCount": str(task.responses),
                "X-CloudTasks-TaskETA": f"{task.due:.6f}",
            }
        )
        if http.get("oauthToken") or http.get("oidcToken"):
            # What the target gets in place of a token minted for the service account.
            headers["Authorization"] = "Bearer emulated-oauth-token"
        body = base64.b64decode(http["body"]) if http.get("body") else None
        request = urllib.request.Request(  # noqa: S310 - http(s) checked at creation
            self._reroute(str(http["url"])), data=body, method=method, headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError as exc:
            return type(exc).__name__

    def _reroute(self, url: str) -> str:
        parts = urlsplit(url)
        base = self.routes.get(parts.hostname or "")
        if base is None:
            return url
        target = urlsplit(base)
        return urlunsplit((target.scheme, target.netloc, parts.path, parts.query, ""))


def start_cloudtasks_emulator(
    *,
    queues: Iterable[str] = (),
    routes: Mapping[str, str] | None = None,
    retry_seconds: float = 1.0,
) -> CloudTasksEmulator:
    """Start the stand-in on a free loopback port with ``queues`` already
    created; ``routes`` maps a target host to the base URL that stands in for it."""
    emulator = CloudTasksEmulator(routes=routes, retry_seconds=retry_seconds)
    for name in queues:
        emulator.add_queue(name)
    emulator.start()
    return emulator
