"""Programs the broker starts beside itself, and how they end.

The emulators the stand-ins launch (Azurite on Node, the Pub/Sub emulator on
Java) start children of their own: a launcher script and its JVM, Node and
its workers. Started with :func:`start_process_group`, each heads a process
group, and signalling the group ends the children with it, where signalling
the process alone would leave them running and holding their ports. And each
dies with the process that started it, even one killed with SIGKILL, which
runs no cleanup: on Linux the kernel sends the death signal
(``PR_SET_PDEATHSIG``, kept across the launcher's ``exec``), so a
``kill -9`` of ``serve --emulate`` leaves no emulator behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["die_with_parent", "start_process_group", "stop_process_group"]

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> Callable[[], None] | None:
    """A function that, called in a process, has the kernel SIGKILL it when its
    parent ends; None where the kernel offers no such thing (not Linux).
    Prepared here, so the forked child only makes one C call before ``exec``."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def arrange() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return arrange


def start_process_group(command: Sequence[str], **options: Any) -> subprocess.Popen[bytes]:
    """Start ``command`` heading a process group of its own, dying with this
    process (see the module docstring); ``options`` go to ``Popen``."""
    # preexec_fn is unsafe where another thread may hold a lock the child
    # needs; this one makes a single prepared C call (no import, no logging,
    # no allocation by Python), which is what the warning allows for.
    return subprocess.Popen(  # noqa: S603 - callers pass fixed programs of their own
        list(command),
        start_new_session=True,
        preexec_fn=die_with_parent(),  # noqa: PLW1509
        **options,
    )


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
