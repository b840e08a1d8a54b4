"""What the on-prem tests share (provider, manifests and the Kubernetes Secret
store): the Kubernetes API stand-in with a client loaded as kubectl loads one,
and a deployment record for the on-prem provider.

The fixtures reach tests through ``conftest.py`` in ``tests/providers/onprem`` and
``tests/secrets``.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from urllib3.connection import HTTPConnection

from kidp.kube_emulator import KubeEmulator, start_kubernetes_emulator
from kidp.models import DeletionPolicy, Deployment, ResourceType
from kidp.providers.onprem import manifests as m

NS = "team-platform"


@pytest.fixture
def emulator() -> Iterator[KubeEmulator]:
    """The Kubernetes API stand-in, serving over HTTP for one test."""
    emu = start_kubernetes_emulator(ready_delay=0.05)
    yield emu
    emu.stop()


@pytest.fixture
def kubeconfig(emulator: KubeEmulator, tmp_path: Path) -> Path:
    """A kubeconfig file pointing at ``emulator``."""
    return emulator.write_kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
def api(kubeconfig: Path) -> Any:
    """A client loaded from the kubeconfig, as kubectl (and the broker) load one."""
    return kube_client(kubeconfig)


def kube_client(kubeconfig: Path) -> Any:
    """A ``kubernetes.client.ApiClient`` for the cluster ``kubeconfig`` names."""
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(
        config_file=str(kubeconfig), client_configuration=configuration
    )
    # The stand-in writes a response's headers and body in two sends, so on a
    # reused keep-alive connection Nagle meets the client's delayed ACK and
    # every answer waits 40 ms; acknowledging at once avoids the stall.
    options = list(HTTPConnection.default_socket_options)
    if hasattr(socket, "TCP_QUICKACK"):
        options.append((socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1))
    configuration.socket_options = options
    return kubernetes.client.ApiClient(configuration)


def deployment(
    resource_type: ResourceType = ResourceType.DATABASE,
    *,
    name: str = "app-db",
    namespace: str = NS,
    policy: DeletionPolicy = DeletionPolicy.DELETE,
    deployment_id: str = "deploy-" + "ab" * 16,
    **spec: Any,
) -> Deployment:
    """A valid on-prem deployment (the manifests' sample, in namespace ``NS``
    under ``deployment_id``); a database without an engine is PostgreSQL 15."""
    sample = m.sample_deployment(
        resource_type, name=name, namespace=namespace, policy=policy, **spec
    )
    return sample.model_copy(update={"id": deployment_id, "region": "test"})
