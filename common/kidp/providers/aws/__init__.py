"""The AWS provider (a package: :mod:`~kidp.providers.aws.provider`, with the
clients and error helpers it shares with the other AWS adapters)."""

from kidp.providers.aws.provider import (
    PROVIDER_NAME,
    RDS_FORBIDDEN_PASSWORD_CHARS,
    AwsProvider,
    final_snapshot_name,
)

__all__ = ["PROVIDER_NAME", "RDS_FORBIDDEN_PASSWORD_CHARS", "AwsProvider", "final_snapshot_name"]
