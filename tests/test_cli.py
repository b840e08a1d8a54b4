"""The command line: token minting and the dead-letter commands."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kidp.auth import TokenVerifier
from kidp.cli import main
from kidp.models import Job, JobKind


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
    listed = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [(x["type"], x["state"], x["deploymentId"]) for x in listed] == [
        ("callback", "retrying", deployment_id),
        ("callback", "retrying", deployment_id),
    ]
    assert {x["phase"] for x in listed} == {"Provisioning", "Ready"}
    letter_id = listed[0]["id"]

    assert main(["dlq", "replay", letter_id]) == 1  # the receiver is still down
    capsys.readouterr()
    h.receiver.fail_with = None
    assert main(["dlq", "replay", letter_id]) == 0
    assert json.loads(capsys.readouterr().out)["callbacks"]["resolved"] == [letter_id]
    assert h.receiver.log[-1][1]["deploymentId"] == deployment_id
    assert main(["dlq", "list"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1
    assert main(["dlq", "replay", "dl_nonesuch"]) == 1
    assert "no dead job or callback has the id dl_nonesuch" in capsys.readouterr().err


def test_dlq_lists_and_replays_dead_jobs_too(
    make_broker: Any, env: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    h = make_broker()
    env.setenv("KIDP_STORE_URL", h.broker.settings.store_url)
    queue = h.broker.service.queue
    job = Job(kind=JobKind.POLL, deployment_id="deploy-" + "0" * 32)
    queue.enqueue(job)
    (delivery,) = queue.receive(max_jobs=1, lease_seconds=30)
    queue.dead_letter(delivery, reason="gave up")

    assert main(["dlq", "list"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert json.loads(line) == {
        "type": "job",
        "jobId": job.id,
        "kind": "poll",
        "deploymentId": job.deployment_id,
        "reason": "gave up",
    }
    assert main(["dlq", "replay", job.id]) == 0
    assert queue.dead_jobs() == []
    assert [d.job for d in queue.receive(max_jobs=1, lease_seconds=30)] == [job]


def test_scan_and_dlq_with_emulate_say_what_to_start_when_none_runs(
    env: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["scan", "drift", "--emulate"]) == 2
    err = capsys.readouterr().err
    assert "no emulated aws broker has run" in err
    assert "kidp-broker serve --emulate --provider aws" in err
    assert main(["dlq", "list", "--emulate"]) == 2
    assert "kidp-broker serve --emulate" in capsys.readouterr().err


def test_help_shows_defaults_and_no_markup(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ([], ["serve"], ["token"], ["demo"], ["scan"], ["dlq"], ["receiver"]):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        text = capsys.readouterr().out
        assert "``" not in text and ":mod:" not in text and ":func:" not in text
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    serve = capsys.readouterr().out
    for shown in ("(default: 127.0.0.1)", "(default: 8082)", "(default: all)", "--emulate"):
        assert shown in serve
    with pytest.raises(SystemExit):
        main(["token", "--help"])
    assert "(default: 1h)" in capsys.readouterr().out
