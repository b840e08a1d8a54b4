"""The Google Cloud adapters' shared pieces; the provider, one module per resource kind, lands here.

:mod:`~kidp.providers.gcp.errors` is shared by every GCP adapter (the
provider, the Pub/Sub queue, the Secret Manager store, the Cloud SQL store).
"""
