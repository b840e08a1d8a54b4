"""The command line: token minting and the dead-letter commands."""

from __future__ import annotations

from typing import Any

import pytest

from kidp.auth import TokenVerifier
from kidp.cli import main


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Any:
    monkeypatch.setenv("KIDP_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("KIDP_JWT_SECRET", "c" * 40)
    return monkeypatch


def test_token_mints_what_the_broker_verifies(env: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "--scope", "deploy,read", "--namespace", "team-a", "--ttl", "1h"]) == 0
    token = capsys.readouterr().out.strip()
    caller = TokenVerifier(issuer="kidp", audience="kidp-broker", hs_secret="c" * 40).verify(token)
    assert caller.scopes == {"deploy", "read"}
    assert caller.namespaces == {"team-a"}


def test_token_without_a_configured_key_uses_the_development_key(
    env: Any, capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    env.delenv("KIDP_JWT_SECRET")
    assert main(["token", "--scope", "read", "--namespace", "*"]) == 0
    key = (tmp_path / "state" / "jwt-secret").read_text().strip()
    token = capsys.readouterr().out.strip()
    assert TokenVerifier(issuer="kidp", audience="kidp-broker", hs_secret=key).verify(token)


def test_bad_ttl_is_a_clear_error(env: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "--scope", "read", "--namespace", "x", "--ttl", "soon"]) == 2
    assert "kidp-broker:" in capsys.readouterr().err


def test_dlq_list_and_replay(
    make_broker: Any, env: Any, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    h = make_broker()
    h.receiver.fail_with = 500
    deployment_id = h.submit().deployment_id
    h.drain()
    for name, value in {
        "KIDP_STORE_URL": h.broker.settings.store_url,
        "KIDP_CALLBACK_SECRET": h.receiver.secret,
        "KIDP_CALLBACK_ALLOWLIST": "127.0.0.1",
    }.items():
        env.setenv(name, value)

    assert main(["dlq", "list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(deployment_id in line for line in lines)
    letter_id = lines[0].split()[0]

    assert main(["dlq", "replay", letter_id]) == 1  # the receiver is still down
    capsys.readouterr()
    h.receiver.fail_with = None
    assert main(["dlq", "replay", letter_id]) == 0
    assert "delivered" in capsys.readouterr().out
    assert h.receiver.log[-1][1]["deploymentId"] == deployment_id
    assert main(["dlq", "list"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1
