"""Fixtures of the provider tests: the Kubernetes API stand-in and its client
(defined in ``support.py``, which the secret store's tests share)."""

from tests.providers.onprem.support import api, emulator, kubeconfig

__all__ = ["api", "emulator", "kubeconfig"]
