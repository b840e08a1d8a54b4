"""The emulated GCP data plane (``kidp.gcp_platform_emulator``): the settings it
returns build, through the composition root, a pull queue whose delays and
dead letters work and a secret store, as ``serve --provider gcp --emulate``
will use them."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kidp.bootstrap import build_queue, build_secrets, build_store
from kidp.gcp_platform_emulator import start_gcp_platform
from kidp.models import Job, JobKind
from kidp.queues.pubsub import PubSubJobQueue
from kidp.secrets.gcpsecretmanager import SecretManagerStore
from kidp.settings import Settings

pytestmark = pytest.mark.pubsub


def test_the_settings_it_returns_wire_a_working_queue_and_secret_store(
    pubsub_emulator_host: str, gcp_project: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PUBSUB_EMULATOR_HOST", raising=False)
    cloud = start_gcp_platform(
        tmp_path, project=gcp_project, max_deliveries=5, pubsub_host=pubsub_emulator_host
    )
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", pubsub_emulator_host)
    try:
        assert cloud.environ == {"PUBSUB_EMULATOR_HOST": pubsub_emulator_host}
        settings = Settings(
            store_url=f"sqlite:///{tmp_path}/broker.db", state_dir=tmp_path, **cloud.settings
        )
        store = build_store(settings)
        queue = build_queue(settings, store)
        assert isinstance(queue, PubSubJobQueue)
        queue.check()
        job = Job(kind=JobKind.POLL, deployment_id="deploy-1")
        queue.enqueue(job, delay=0.5)
        assert queue.receive(max_jobs=5, lease_seconds=30) == []
        deadline = time.monotonic() + 5
        while not (got := queue.receive(max_jobs=5, lease_seconds=30)):
            assert time.monotonic() < deadline, "the delayed job never came"
            time.sleep(0.05)
        (delivery,) = got
        assert delivery.job == job
        queue.dead_letter(delivery, reason="checked")
        assert queue.dead_jobs() == [(job, "checked")]

        secrets = build_secrets(settings)
        assert isinstance(secrets, SecretManagerStore)
        ref, value = secrets.ensure("kidp/team-a/db-credentials", lambda: {"password": "x"}, {})
        assert ref.id == f"projects/{gcp_project}/secrets/kidp_team-a_db-credentials"
        assert value == {"password": "x"}
        queue.close()
        store.close()  # type: ignore[attr-defined]
    finally:
        cloud.stop()
