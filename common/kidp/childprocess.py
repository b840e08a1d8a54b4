"""Ending a program started in a process group of its own.

The emulators the stand-ins launch (Azurite on Node, the Pub/Sub emulator on
Java) start children of their own: a launcher script and its JVM, Node and
its workers. Started with ``start_new_session=True``, each heads a process
group, and signalling the group ends the children with it, where signalling
the process alone would leave them running and holding their ports.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

__all__ = ["stop_process_group"]


def stop_process_group(process: subprocess.Popen[bytes], *, timeout: float = 10.0) -> None:
    """End ``process`` and its group: SIGTERM, then SIGKILL if it has not
    exited within ``timeout`` seconds. Nothing happens once it has exited."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)
