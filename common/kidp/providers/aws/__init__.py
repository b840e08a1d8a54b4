"""The AWS provider, one module per resource kind.

:mod:`~kidp.providers.aws.provider` holds :class:`AwsProvider` (the port's
operations and the call plumbing); :mod:`~kidp.providers.aws.clients` and
:mod:`~kidp.providers.aws.errors` are shared with the other AWS adapters (the
DynamoDB store, the SQS queue, the Secrets Manager store).
"""

from kidp.providers.aws.base import PROVIDER_NAME, RDS_FORBIDDEN_PASSWORD_CHARS, final_snapshot_name
from kidp.providers.aws.provider import AwsProvider

__all__ = ["PROVIDER_NAME", "RDS_FORBIDDEN_PASSWORD_CHARS", "AwsProvider", "final_snapshot_name"]
