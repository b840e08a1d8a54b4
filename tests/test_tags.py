from __future__ import annotations

import re

import pytest

from kidp.tags import TAG_NAMES, decode, encode, is_managed

LOGICAL = {
    "managed-by": "kidp",
    "deployment-id": "deploy-fc8fc917314e2b8b698427458cd35342",
    "resource-uid": "550e8400-e29b-41d4-a716-446655440000",
    "team": "backend-team",
    "application": "user-service",
}


def test_aws_and_kubernetes_keep_the_seed_keys() -> None:
    encoded = encode(LOGICAL, dialect="aws")
    assert encoded["platform.company.com/managed-by"] == "kidp"
    assert encode(LOGICAL, dialect="kubernetes") == encoded


@pytest.mark.parametrize("dialect", ["aws", "kubernetes", "azure", "gcp"])
def test_every_dialect_round_trips(dialect: str) -> None:
    encoded = encode(LOGICAL, dialect=dialect)  # type: ignore[arg-type]
    assert decode({**encoded, "unrelated": "x"}, dialect=dialect) == LOGICAL  # type: ignore[arg-type]
    assert is_managed(encoded, dialect=dialect)  # type: ignore[arg-type]


def test_azure_keys_have_no_slash_and_gcp_keys_follow_label_rules() -> None:
    assert all("/" not in key for key in encode(LOGICAL, dialect="azure"))
    for key, value in encode(LOGICAL, dialect="gcp").items():
        assert re.fullmatch(r"[a-z][a-z0-9_-]{0,62}", key)
        assert re.fullmatch(r"[a-z0-9_-]{0,63}", value)
    assert len(TAG_NAMES) == 5
