"""Fixtures of the secret store tests: the Kubernetes API stand-in, shared with
the on-prem provider's tests (``tests/providers/onprem/support.py``)."""

from tests.providers.onprem.support import emulator, kubeconfig

__all__ = ["emulator", "kubeconfig"]
