"""The five tracking tags of seed 000, and their encoding for each cloud.

Logical tags are ``managed-by``, ``deployment-id``, ``resource-uid``, ``team`` and
``application`` under a prefix (default ``platform.company.com/``). Clouds
disagree on what a key may hold, so one encoder maps them per cloud and
:func:`decode` maps them back for the scans.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

from kidp.models import Deployment

MANAGED_BY = "managed-by"
DEPLOYMENT_ID = "deployment-id"
RESOURCE_UID = "resource-uid"
TEAM = "team"
APPLICATION = "application"
TAG_NAMES = (MANAGED_BY, DEPLOYMENT_ID, RESOURCE_UID, TEAM, APPLICATION)

DEFAULT_PREFIX = "platform.company.com/"
MANAGED_BY_VALUE = "kidp"

TagDialect = Literal["aws", "kubernetes", "azure", "gcp"]

_GCP_INVALID = re.compile(r"[^a-z0-9_-]")
_AZURE_INVALID = re.compile(r"[<>%&\\?/]")


def logical_tags(deployment: Deployment, *, managed_by: str = MANAGED_BY_VALUE) -> dict[str, str]:
    """The five tags for ``deployment``, by logical name."""
    return {
        MANAGED_BY: managed_by,
        DEPLOYMENT_ID: deployment.id,
        RESOURCE_UID: deployment.resource_uid,
        TEAM: deployment.team,
        APPLICATION: deployment.application,
    }


def encode_key(name: str, *, dialect: TagDialect, prefix: str = DEFAULT_PREFIX) -> str:
    """The key a cloud accepts for the logical tag ``name``."""
    key = f"{prefix}{name}"
    if dialect in ("aws", "kubernetes"):
        return key
    if dialect == "azure":
        return _AZURE_INVALID.sub("_", key)
    # GCP label keys: lowercase letters, digits, '_' and '-', start with a letter, <= 63.
    encoded = _GCP_INVALID.sub("_", key.lower())
    if not encoded[:1].isalpha():
        encoded = f"k{encoded}"
    return encoded[:63]


def encode_value(value: str, *, dialect: TagDialect) -> str:
    """The value a cloud accepts (GCP label values share the key alphabet)."""
    if dialect == "gcp":
        return _GCP_INVALID.sub("_", value.lower())[:63]
    return value


def encode(
    tags: Mapping[str, str], *, dialect: TagDialect, prefix: str = DEFAULT_PREFIX
) -> dict[str, str]:
    """Logical tags -> the cloud's keys and values."""
    return {
        encode_key(name, dialect=dialect, prefix=prefix): encode_value(value, dialect=dialect)
        for name, value in tags.items()
    }


def decode(
    cloud_tags: Mapping[str, str], *, dialect: TagDialect, prefix: str = DEFAULT_PREFIX
) -> dict[str, str]:
    """The cloud's tags -> logical tags; foreign tags are dropped."""
    by_key = {encode_key(name, dialect=dialect, prefix=prefix): name for name in TAG_NAMES}
    return {by_key[key]: value for key, value in cloud_tags.items() if key in by_key}


def is_managed(
    cloud_tags: Mapping[str, str],
    *,
    dialect: TagDialect,
    prefix: str = DEFAULT_PREFIX,
    managed_by: str = MANAGED_BY_VALUE,
) -> bool:
    """True when the resource carries this broker's managed-by tag."""
    return decode(cloud_tags, dialect=dialect, prefix=prefix).get(MANAGED_BY) == managed_by
