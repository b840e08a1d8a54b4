"""The Azure adapters' shared pieces; the provider, one module per resource kind, lands here.

:mod:`~kidp.providers.azure.errors` is shared by every Azure adapter (the
provider, the Table Storage store, the Storage Queue, the Key Vault store).
"""
