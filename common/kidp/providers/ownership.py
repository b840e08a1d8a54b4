"""What every provider stamps on the resources it makes.

The logical tags (:mod:`kidp.tags`) are how a provider later recognises its own
resources: adoption, delete and the scans all key on the deployment id. Each
provider encodes them in its cloud's dialect; the merge and the check that the
caller's tags name the deployment being made are the same everywhere, so they
live here.
"""

from __future__ import annotations

from collections.abc import Mapping

from kidp import tags as tagging
from kidp.errors import ProvisioningFailed
from kidp.models import Deployment


def deployment_tags(
    deployment: Deployment, tags: Mapping[str, str], *, managed_by: str
) -> dict[str, str]:
    """``deployment``'s logical tags overlaid with ``tags`` (the service's).

    Raises ``ProvisioningFailed`` when ``tags`` name another deployment: a
    resource labelled so would be adopted, or deleted, by the wrong one.
    """
    logical = {**tagging.logical_tags(deployment, managed_by=managed_by), **tags}
    if logical[tagging.DEPLOYMENT_ID] != deployment.id:
        raise ProvisioningFailed(
            f"tags name deployment {logical[tagging.DEPLOYMENT_ID]} "
            f"but the deployment is {deployment.id}"
        )
    return logical
