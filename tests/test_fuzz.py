"""A schema fuzzer against the OpenAPI document: whatever it sends, no 5xx.

The document is the committed ``docs/openapi.json`` (a test in test_api.py
proves it equals what the app serves); requests go through the real app with
the AWS provider on moto.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from starlette.testclient import TestClient
from tests.conftest import bearer_token

SECRET = "f" * 40
ROOT = Path(__file__).resolve().parents[1]
schema = schemathesis.openapi.from_path(ROOT / "docs" / "openapi.json")


@pytest.fixture(scope="module")
def fuzz_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    from moto import mock_aws

    from kidp.bootstrap import build
    from kidp.settings import Settings

    fake = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {key: os.environ.get(key) for key in fake}
    os.environ.update(fake)
    state = tmp_path_factory.mktemp("fuzz")
    try:
        with mock_aws():
            broker = build(
                Settings(
                    store_url=f"sqlite:///{state}/broker.db",
                    state_dir=state,
                    jwt_secret=SECRET,
                    rate_limit_per_minute=10**9,
                    callback_allowlist=["127.0.0.1"],
                )
            )
            yield TestClient(broker.app)
            broker.close()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


AUTH = {"Authorization": f"Bearer {bearer_token(SECRET, subject='fuzzer')}"}


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_never_get_a_server_error(case: Any, fuzz_client: TestClient) -> None:
    kwargs = case.as_transport_kwargs(base_url="http://testserver", headers=AUTH)
    if not kwargs.get("cookies"):
        kwargs.pop("cookies", None)
    response = fuzz_client.request(**kwargs)
    case.validate_response(response, checks=[not_a_server_error])
