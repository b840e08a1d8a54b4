"""The watcher of seed 004: Kubernetes watches on the objects this broker manages.

Each watched kind streams changes to objects carrying the managed-by label;
every change names a deployment (its deployment-id label) and is handed to
``on_change``, which enqueues a sync job. So a StatefulSet deleted by hand
becomes a drift or Failed callback within seconds rather than at the next
scan. The watch resumes from the last resourceVersion it saw; when the API
answers 410 Gone (the history has moved on) it lists again, and every object
listed counts as changed, so nothing that happened in between is missed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kidp.tags import DEPLOYMENT_ID, MANAGED_BY, encode_key

log = logging.getLogger("kidp.watcher")


@dataclass(frozen=True)
class WatchedKind:
    """One kind to watch: a list call of the kubernetes client that spans namespaces."""

    name: str
    api: str  # "AppsV1Api" or "CoreV1Api"
    list_method: str


WATCHED_KINDS = (
    WatchedKind("statefulsets", "AppsV1Api", "list_stateful_set_for_all_namespaces"),
    WatchedKind("deployments", "AppsV1Api", "list_deployment_for_all_namespaces"),
    # Pods carry the template's labels: an image pull error shows here first.
    WatchedKind("pods", "CoreV1Api", "list_pod_for_all_namespaces"),
    WatchedKind("services", "CoreV1Api", "list_service_for_all_namespaces"),
)


class ManagedObjectWatcher:
    """Watches every kind in ``kinds`` in its own thread until :meth:`stop`."""

    def __init__(
        self,
        api_client: Any,
        on_change: Callable[[str], None],
        *,
        tag_prefix: str,
        managed_by: str,
        kinds: tuple[WatchedKind, ...] = WATCHED_KINDS,
        timeout_seconds: int = 60,
        retry_seconds: float = 2.0,
    ) -> None:
        self.api_client = api_client
        self.on_change = on_change
        self.kinds = kinds
        self.timeout_seconds = timeout_seconds
        self.retry_seconds = retry_seconds
        self.label_selector = (
            f"{encode_key(MANAGED_BY, dialect='kubernetes', prefix=tag_prefix)}={managed_by}"
        )
        self.id_label = encode_key(DEPLOYMENT_ID, dialect="kubernetes", prefix=tag_prefix)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        #: Changes seen per kind (read by tests and the metrics endpoint).
        self.seen: dict[str, int] = {kind.name: 0 for kind in kinds}

    def start(self) -> None:
        """Start one daemon thread per watched kind."""
        for kind in self.kinds:
            thread = threading.Thread(
                target=self._run, args=(kind,), name=f"watch-{kind.name}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop watching; an open watch ends at its server timeout at the latest."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)

    def _run(self, kind: WatchedKind) -> None:
        from kubernetes import client

        api = getattr(client, kind.api)(self.api_client)
        list_call = getattr(api, kind.list_method)
        version: str | None = None
        while not self._stop.is_set():
            try:
                if version is None:
                    version = self._relist(kind, list_call)
                version = self._watch(kind, list_call, version)
            except Exception as exc:
                status = getattr(exc, "status", None)
                if status == 410:
                    log.info("watch expired; listing again", extra={"kind": kind.name})
                    version = None
                    continue
                log.warning(
                    "watch interrupted",
                    extra={"kind": kind.name, "status": status},
                    exc_info=True,
                )
                self._stop.wait(self.retry_seconds)

    def _relist(self, kind: WatchedKind, list_call: Callable[..., Any]) -> str:
        listed = list_call(label_selector=self.label_selector)
        for item in listed.items:
            self._changed(kind, item)
        return str(listed.metadata.resource_version)

    def _watch(self, kind: WatchedKind, list_call: Callable[..., Any], version: str) -> str | None:
        from kubernetes import watch

        stream = watch.Watch()
        try:
            for event in stream.stream(
                list_call,
                label_selector=self.label_selector,
                resource_version=version,
                timeout_seconds=self.timeout_seconds,
                allow_watch_bookmarks=True,
            ):
                if self._stop.is_set():
                    break
                kind_of_event = event.get("type")
                obj = event.get("object")
                if kind_of_event == "ERROR":
                    code = (event.get("raw_object") or {}).get("code")
                    if code == 410:
                        return None
                    raise RuntimeError(f"watch error {code}")
                resource_version = getattr(getattr(obj, "metadata", None), "resource_version", None)
                if resource_version:
                    version = str(resource_version)
                if kind_of_event in ("ADDED", "MODIFIED", "DELETED"):
                    self._changed(kind, obj)
        finally:
            stream.stop()
        return version

    def _changed(self, kind: WatchedKind, obj: Any) -> None:
        labels = getattr(getattr(obj, "metadata", None), "labels", None) or {}
        deployment_id = labels.get(self.id_label)
        if not deployment_id:
            return
        self.seen[kind.name] += 1
        try:
            self.on_change(deployment_id)
        except Exception:
            # A failing enqueue must not end the watch; reconcile catches up later.
            log.exception("sync enqueue failed", extra={"deploymentId": deployment_id})
