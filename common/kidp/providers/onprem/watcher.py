"""The change watcher (seed 004): changes to managed objects become sync jobs."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kidp.providers.onprem.api import labels_of

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------
# The watcher (seed 004): changes to managed objects become sync jobs


@dataclass(frozen=True)
class WatchedKind:
    """One kind the change watcher follows: the typed API and the resource."""

    api: str
    name: str
    list_method: str


#: What the watcher watches, cluster-wide, by the managed-by label: the
#: workloads (a StatefulSet deleted or scaled by hand), their pods (readiness,
#: image pulls, scheduling), Services and claims. Operator resources are left
#: to polls and the drift scan.
WATCHED_KINDS: tuple[WatchedKind, ...] = (
    WatchedKind("AppsV1Api", "statefulsets", "list_stateful_set_for_all_namespaces"),
    WatchedKind("AppsV1Api", "deployments", "list_deployment_for_all_namespaces"),
    WatchedKind("CoreV1Api", "pods", "list_pod_for_all_namespaces"),
    WatchedKind("CoreV1Api", "services", "list_service_for_all_namespaces"),
    WatchedKind(
        "CoreV1Api",
        "persistentvolumeclaims",
        "list_persistent_volume_claim_for_all_namespaces",
    ),
)


class KubernetesChangeWatcher:
    """:class:`kidp.ports.ChangeWatcher`: one thread per watched kind, each a
    Kubernetes watch (list for a resourceVersion, then watch from it; 410 Gone
    starts over; other failures retry after ``retry_seconds``). Events that
    happened while no watch ran are not replayed: the drift scan finds those.
    ``on_change`` runs on the watch threads and must be quick (it enqueues)."""

    def __init__(
        self,
        api_client: Any,
        *,
        label_selector: str,
        deployment_label: str,
        on_change: Callable[[str], None],
        kinds: Sequence[WatchedKind] = WATCHED_KINDS,
        timeout_seconds: int = 60,
        retry_seconds: float = 2.0,
    ) -> None:
        from kubernetes import client

        self.apis = {
            "AppsV1Api": client.AppsV1Api(api_client),
            "CoreV1Api": client.CoreV1Api(api_client),
        }
        self.label_selector = label_selector
        self.deployment_label = deployment_label
        self.on_change = on_change
        self.kinds = tuple(kinds)
        self.timeout_seconds = timeout_seconds
        self.retry_seconds = retry_seconds
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watches: dict[str, Any] = {}
        self._lock = threading.Lock()
        #: Set once every kind's first watch is open (tests wait for it).
        self.watching = threading.Event()
        self._open: set[str] = set()

    def start(self) -> None:
        """Start one watch thread per kind; returns at once."""
        for kind in self.kinds:
            thread = threading.Thread(
                target=self._run, args=(kind,), name=f"kube-watch-{kind.name}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        """Close the watches and wait for the threads (up to ``timeout`` seconds)."""
        self._stop.set()
        with self._lock:
            responses = list(self._watches.values())
        for response in responses:
            # Ends the read the watch thread is blocked in.
            with contextlib.suppress(Exception):
                response.shutdown()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _run(self, kind: WatchedKind) -> None:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        list_fn = getattr(self.apis[kind.api], kind.list_method)
        version: str | None = None
        while not self._stop.is_set():
            try:
                if version is None:
                    version = self._current_version(list_fn)
                version = self._watch(kind, list_fn, version)
            except ApiException as exc:
                if exc.status == 410:
                    version = None
                    continue
                logger.warning("watch of %s failed (%s); retrying", kind.name, exc.status)
                self._stop.wait(self.retry_seconds)
            except (HTTPError, OSError, ValueError) as exc:
                if self._stop.is_set():
                    break
                logger.warning("watch of %s broke (%s); retrying", kind.name, type(exc).__name__)
                self._stop.wait(self.retry_seconds)

    def _watch(
        self, kind: WatchedKind, list_fn: Callable[..., Any], version: str | None
    ) -> str | None:
        """One watch request from ``version``, read line by line as JSON: only
        the labels are needed, so the client's model objects (most of a
        watcher's CPU) are never built. Returns where to continue from (None
        after 410 Gone: list again)."""
        from kubernetes.watch.watch import iter_resp_lines

        response = list_fn(
            label_selector=self.label_selector,
            resource_version=version,
            timeout_seconds=self.timeout_seconds,
            allow_watch_bookmarks=True,
            watch=True,
            _preload_content=False,
        )
        with self._lock:
            self._watches[kind.name] = response
        self._opened(kind)
        try:
            for line in iter_resp_lines(response):
                if self._stop.is_set():
                    break
                if not line.strip():
                    continue
                event = json.loads(line)
                raw = event.get("object") or {}
                if event.get("type") == "ERROR":
                    # 410 Gone: our resourceVersion is too old; list again.
                    return None if raw.get("code") == 410 else version
                version = (raw.get("metadata") or {}).get("resourceVersion") or version
                if event.get("type") != "BOOKMARK":
                    self._notify(raw)
        finally:
            with contextlib.suppress(Exception):
                response.release_conn()
        return version

    def _current_version(self, list_fn: Callable[..., Any]) -> str | None:
        answer = list_fn(label_selector=self.label_selector, limit=1, _preload_content=False)
        return str(json.loads(answer.data)["metadata"].get("resourceVersion") or "") or None

    def _opened(self, kind: WatchedKind) -> None:
        with self._lock:
            self._open.add(kind.name)
            if len(self._open) == len(self.kinds):
                self.watching.set()

    def _notify(self, raw: Mapping[str, Any]) -> None:
        deployment_id = labels_of(raw).get(self.deployment_label)
        if not deployment_id:
            return
        try:
            self.on_change(deployment_id)
        except Exception:
            # One failed enqueue must not end the watch; the drift scan catches up.
            logger.warning("change handler failed for %s", deployment_id, exc_info=True)
