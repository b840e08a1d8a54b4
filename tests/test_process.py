"""The broker as separate processes: the README's demo, and a kill -9 in the
middle of provisioning. The AWS emulator runs in the test process so it
outlives the broker it serves."""

from __future__ import annotations

import collections
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from kidp.auth import mint_token
from kidp.emulator import free_port, start_aws_emulator

pytestmark = [pytest.mark.slow, pytest.mark.emulator]
EXE = str(Path(sys.executable).with_name("kidp-broker"))
SECRET = "p" * 40


@pytest.fixture
def emulator(aws_credentials: None) -> Iterator[str]:
    running = start_aws_emulator()
    yield running.endpoint_url
    running.stop()


def start_broker(env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [EXE, "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readiness", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
    raise AssertionError("broker did not become ready")


def test_demo_runs_end_to_end_and_never_prints_the_password(tmp_path: Path) -> None:
    result = subprocess.run(
        [EXE, "demo"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
        env={**os.environ, "KIDP_LOG_LEVEL": "WARNING"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for expected in (
        "POST /v1/provision",
        "callback  Provisioning",
        "callback  Ready",
        "callback  Deleted",
        "secretRef",
        "estimated_monthly",
        "deployment-id",
        "demo: done",
    ):
        assert expected in out, out
    assert "password" not in (out + result.stderr).lower()


def test_kill_9_mid_provision_finishes_every_deployment_exactly_once(
    tmp_path: Path, emulator: str, receiver: Any
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "KIDP_STATE_DIR": str(tmp_path / "state"),
        "KIDP_STORE_URL": f"sqlite:///{tmp_path}/broker.db",
        "KIDP_AWS_ENDPOINT_URL": emulator,
        "KIDP_JWT_SECRET": SECRET,
        "KIDP_CALLBACK_SECRET": receiver.secret,
        "KIDP_CALLBACK_ALLOWLIST": "127.0.0.1",
        # Keep deployments in Provisioning long enough to die in the middle.
        "KIDP_POLL_INTERVAL_SECONDS": "3",
        "KIDP_JOB_LEASE_SECONDS": "2",
        "KIDP_RECONCILE_INTERVAL_SECONDS": "1",
        "KIDP_LOG_LEVEL": "WARNING",
    }
    token = mint_token(
        secret=SECRET,
        subject="t",
        scopes=["deploy", "read"],
        namespaces=["*"],
        ttl_seconds=600,
        issuer="kidp",
        audience="kidp-broker",
    )
    headers = {"Authorization": f"Bearer {token}"}
    proc = start_broker(env, port)
    ids = []
    for n in range(6):
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/provision",
            headers=headers,
            json={
                "resourceType": "database",
                "resourceName": f"crash-{n}",
                "namespace": "team-a",
                "team": "a-team",
                "owner": "a@example.com",
                "callbackUrl": receiver.url,
                "spec": {"engine": "postgresql", "version": "15"},
            },
        )
        assert response.status_code == 202, response.text
        ids.append(response.json()["deploymentId"])
    deadline = time.monotonic() + 30
    while "Provisioning" not in [p["phase"] for _, p in receiver.log]:
        assert time.monotonic() < deadline, "nothing started provisioning"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    not_ready = [
        i
        for i in ids
        if i not in {p["deploymentId"] for _, p in receiver.log if p["phase"] == "Ready"}
    ]
    assert not_ready, "the kill came too late to prove anything"

    proc = start_broker(env, port)
    try:
        deadline = time.monotonic() + 90
        while True:
            ready = {p["deploymentId"] for _, p in receiver.log if p["phase"] == "Ready"}
            if ready >= set(ids):
                break
            assert time.monotonic() < deadline, f"not Ready: {set(ids) - ready}"
            time.sleep(0.2)
        time.sleep(1)  # let any duplicate arrive before counting
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)

    ready_events = {
        (p["deploymentId"], webhook_id) for webhook_id, p in receiver.log if p["phase"] == "Ready"
    }
    per_deployment = collections.Counter(deployment for deployment, _ in ready_events)
    assert per_deployment == {i: 1 for i in ids}
    client = boto3.client("rds", region_name="us-east-1", endpoint_url=emulator)
    tagged = [
        {t["Key"]: t["Value"] for t in instance["TagList"]}["platform.company.com/deployment-id"]
        for instance in client.describe_db_instances()["DBInstances"]
    ]
    assert sorted(tagged) == sorted(ids)


def test_serve_emulate_runs_its_parts_apart_and_scans_reach_its_cloud_and_store(
    tmp_path: Path,
) -> None:
    """``serve --emulate``: the API here, workers and the emulated cloud in child
    processes; ``scan --emulate`` reaches both; a second one is refused; kill -9
    takes the children down with it, and the record then says it stopped."""
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KIDP_")},
        "KIDP_STATE_DIR": str(tmp_path / "state"),
        "KIDP_JWT_SECRET": SECRET,
        "KIDP_LOG_LEVEL": "WARNING",
        "KIDP_POLL_INTERVAL_SECONDS": "1",
    }
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [EXE, "serve", "--emulate", "--port", str(port)], env=env, stdout=log, stderr=log
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/readiness", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
        children = [int(p) for p in _children(proc.pid)]
        assert len(children) == 2  # the emulated cloud, and the workers with the timers

        token = mint_token(
            secret=SECRET,
            subject="t",
            scopes=["deploy", "read"],
            namespaces=["team-a"],
            ttl_seconds=600,
            issuer="kidp",
            audience="kidp-broker",
        )
        headers = {"Authorization": f"Bearer {token}"}
        accepted = httpx.post(
            f"{base}/v1/provision",
            headers=headers,
            json={
                "resourceType": "bucket",
                "resourceName": "assets",
                "namespace": "team-a",
                "team": "a",
                "owner": "a@example.com",
                "spec": {"versioning": True},
            },
        )
        assert accepted.status_code == 202, accepted.text
        deployment_id = accepted.json()["deploymentId"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = httpx.get(f"{base}/v1/status", params={"id": deployment_id}, headers=headers)
            if status.json()["phase"] == "Ready":
                break
            time.sleep(0.3)
        assert status.json()["phase"] == "Ready"

        scan = subprocess.run(
            [EXE, "scan", "drift", "--emulate"], env=env, capture_output=True, text=True
        )
        assert scan.returncode == 0, scan.stderr
        assert json.loads(scan.stdout) == {"checked": 1, "changed": 0}

        second = subprocess.run(
            [EXE, "serve", "--emulate", "--port", str(free_port())],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 2
        assert "already running" in second.stderr
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        log.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in children):
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in children)
    scan = subprocess.run([EXE, "scan", "drift", "--emulate"], env=env, capture_output=True)
    assert scan.returncode == 2
    assert b"has stopped" in scan.stderr


def _children(pid: int) -> list[str]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return path.read_text().split() if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent's wait is missing.
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().split()[2] != "Z"


def test_two_serve_emulate_started_together_leave_one_running_on_an_intact_store(
    tmp_path: Path,
) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KIDP_")},
        "KIDP_STATE_DIR": str(tmp_path / "state"),
        "KIDP_JWT_SECRET": SECRET,
        "KIDP_LOG_LEVEL": "WARNING",
    }
    ports = [free_port(), free_port()]
    procs = [
        subprocess.Popen(
            [EXE, "serve", "--emulate", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for port in ports
    ]
    try:
        deadline = time.monotonic() + 60
        losers = []
        while time.monotonic() < deadline and not losers:
            losers = [p for p in procs if p.poll() is not None]
            time.sleep(0.1)
        (loser,) = losers
        assert loser.returncode == 2
        assert loser.stderr is not None and b"already running" in loser.stderr.read()
        (winner,) = [p for p in procs if p is not loser]
        port = ports[procs.index(winner)]
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readiness", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        # The loser emptied nothing: what the winner accepts is in the file
        # on disk that every process of the winner opened.
        token = mint_token(
            secret=SECRET,
            subject="t",
            scopes=["deploy"],
            namespaces=["team-a"],
            ttl_seconds=600,
            issuer="kidp",
            audience="kidp-broker",
        )
        accepted = httpx.post(
            f"http://127.0.0.1:{port}/v1/provision",
            headers={"Authorization": f"Bearer {token}"},
            json={
                "resourceType": "bucket",
                "resourceName": "assets",
                "namespace": "team-a",
                "team": "a",
                "owner": "a@example.com",
                "spec": {},
            },
            timeout=10,
        )
        assert accepted.status_code == 202, accepted.text
        store = tmp_path / "state" / "emulated" / "aws" / "broker.db"
        with sqlite3.connect(store) as db:
            ids = [row[0] for row in db.execute("SELECT id FROM kidp_deployments")]
        assert ids == [accepted.json()["deploymentId"]]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
    # A clean stop forgets the record: nothing claims to be running.
    assert not (tmp_path / "state" / "emulated" / "aws" / "broker.json").exists()
