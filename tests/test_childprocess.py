"""Programs started beside the broker end with it, even after a kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kidp.childprocess import start_process_group, stop_process_group

ROOT = Path(__file__).resolve().parents[1]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] == "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's death signal")
def test_a_started_group_dies_with_a_parent_killed_with_sigkill() -> None:
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from kidp.childprocess import start_process_group\n"
            "child = start_process_group(['sleep', '60'])\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert not _gone(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not _gone(child):
        time.sleep(0.05)
    assert _gone(child)


def test_stop_ends_the_whole_group() -> None:
    # The shell starts a grandchild; stopping the group ends both.
    process = start_process_group(["sh", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE)
    assert process.stdout is not None
    grandchild = int(process.stdout.readline())
    stop_process_group(process, timeout=5)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not _gone(grandchild):
        time.sleep(0.05)
    assert process.poll() is not None and _gone(grandchild)
