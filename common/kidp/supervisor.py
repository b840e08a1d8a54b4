"""The processes of one ``kidp-broker serve``: the API here, the rest beside it.

Provisioning is CPU work (and, with ``--emulate``, so is the emulated cloud);
accepting a request must not queue behind it. So ``serve`` answers HTTP in its
own process and runs the workers, the watcher and the scanner in a child
process (``serve --role worker,watcher,scanner``), and an emulated cloud in
another (``emulate``). Children run at a lower CPU priority (``nice``): under
load the accept path is served first and provisioning takes what is left.

Children die with their parent: each asks the kernel for ``SIGKILL`` when the
process that started it ends (``PR_SET_PDEATHSIG`` on Linux; elsewhere it
checks its parent every second), so a ``kill -9`` of ``serve`` takes the
whole broker down at once, as a crash of one process would, and what it
left half done is picked up by the next start (leases, reconcile). A child
that dies on its own is started again, after 1, 2, 4 ... 30 seconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from kidp.childprocess import die_with_parent
from kidp.errors import ValidationFailed

log = logging.getLogger("kidp.supervisor")

#: The CPU priority of the processes beside the API (``nice`` increment).
CHILD_NICE = 5
#: The longest wait before a child that keeps dying is started again.
MAX_RESTART_DELAY = 30.0


def supervised(parent_pid: int, *, nice: int = 0) -> None:
    """Called first thing in a child: die with ``parent_pid``, at ``nice``."""
    if nice:
        with contextlib.suppress(OSError):
            os.nice(nice)
    arrange = die_with_parent()
    if arrange is not None:
        arrange()
    else:
        # No kernel help: look at the parent once a second.
        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(1.0)
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    if os.getppid() != parent_pid:
        # The parent ended before we asked to follow it.
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Child:
    """One process the supervisor keeps running."""

    name: str
    argv: list[str]
    nice: int = CHILD_NICE
    #: False for a process whose state a restart would lose (an emulated cloud).
    restart: bool = True
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    restart_at: float | None = None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid


@dataclass
class Supervisor:
    """Starts ``kidp-broker`` child processes with ``env`` and keeps them running."""

    env: Mapping[str, str]
    children: list[Child] = field(default_factory=list)
    #: Run once every child has stopped (what the parent holds while they run).
    on_stop: list[Callable[[], None]] = field(default_factory=list)

    def command(self, child: Child) -> list[str]:
        """The command line of ``child``: this interpreter's ``kidp.cli``."""
        return [
            sys.executable,
            "-m",
            "kidp.cli",
            *child.argv,
            "--supervised-by",
            str(os.getpid()),
            "--nice",
            str(child.nice),
        ]

    def start(self, name: str, argv: Sequence[str], *, nice: int = CHILD_NICE) -> Child:
        """Start ``kidp-broker ARGV`` as the child ``name``."""
        child = Child(name=name, argv=list(argv), nice=nice)
        self._launch(child)
        self.children.append(child)
        return child

    def _launch(self, child: Child, *, stdout: int | IO[Any] | None = None) -> None:
        child.process = subprocess.Popen(  # noqa: S603 - this interpreter, our own module
            self.command(child),
            env=dict(self.env),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
        )
        child.started_at = time.monotonic()
        child.restart_at = None
        log.info("process started", extra={"child": child.name, "pid": child.pid})

    def tick(self) -> None:
        """Start again every child that has died (with backoff)."""
        now = time.monotonic()
        for child in self.children:
            process = child.process
            if process is None or process.poll() is None:
                continue
            if not child.restart:
                if child.restart_at is None:
                    child.restart_at = now
                    log.error(
                        "process died and cannot be started again without losing its state",
                        extra={"child": child.name, "exitCode": process.returncode},
                    )
                continue
            if child.restart_at is None:
                # A child that lived a minute had a fault, not a bad start.
                if now - child.started_at > 60:
                    child.restarts = 0
                delay = min(MAX_RESTART_DELAY, 2.0**child.restarts)
                child.restart_at = now + delay
                log.error(
                    "process died; starting it again",
                    extra={
                        "child": child.name,
                        "exitCode": process.returncode,
                        "restartInSeconds": delay,
                    },
                )
            elif now >= child.restart_at:
                child.restarts += 1
                self._launch(child)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM every child (they finish what they are doing), then SIGKILL
        what is still running after ``timeout``."""
        for child in reversed(self.children):
            if child.process is not None and child.process.poll() is None:
                child.process.terminate()
        deadline = time.monotonic() + timeout
        for child in reversed(self.children):
            if child.process is None:
                continue
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("process did not stop in time", extra={"child": child.name})
                child.process.kill()
                child.process.wait(10)
        self.children.clear()
        while self.on_stop:
            self.on_stop.pop()()


@dataclass(frozen=True)
class EmulatorProcess:
    """A stand-in cloud in a process of its own (``kidp-broker emulate``)."""

    child: Child
    provider: str
    settings: dict[str, Any]
    environ: dict[str, str | None]


def start_emulator_process(
    supervisor: Supervisor, provider: str, *, timeout: float = 120.0
) -> EmulatorProcess:
    """Start ``kidp-broker emulate --provider PROVIDER`` and read what it
    announces on its first line of output: the settings and environment that
    point the broker at it."""
    # The emulator keeps its state in memory: restarting it would silently
    # lose every resource the store knows of.
    child = Child(
        name=f"{provider}-emulator", argv=["emulate", "--provider", provider], restart=False
    )
    supervisor._launch(child, stdout=subprocess.PIPE)
    supervisor.children.append(child)
    process = child.process
    assert process is not None
    output = process.stdout
    assert output is not None
    line: list[bytes] = []
    reader = threading.Thread(target=lambda: line.append(output.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not line or not line[0].strip():
        process.kill()
        process.wait(10)
        raise ValidationFailed(
            f"the {provider} emulator did not start within {timeout:g} s "
            f"(exit code {process.poll()}); its errors are above"
        )
    announced = json.loads(line[0])
    return EmulatorProcess(
        child=child,
        provider=provider,
        settings=dict(announced["settings"]),
        environ=dict(announced["environ"]),
    )
