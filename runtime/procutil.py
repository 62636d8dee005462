"""Process plumbing shared by `fhirq up` and the embedded servers: spawning children that die
with their parent, and stopping process trees until psutil agrees nothing is left."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import IO

import psutil

__all__ = ["alive", "kill_all", "spawn", "terminate_tree", "tree", "wait_gone"]

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent(parent_pid: int) -> None:
    """preexec_fn: ask Linux to SIGTERM the child if its parent dies, so a SIGKILLed
    `fhirq up` (or test session) does not leave servers running."""
    if _libc is None:
        return
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    stdout: IO[bytes] | int | None = None,
    stderr: IO[bytes] | int | None = None,
) -> subprocess.Popen[bytes]:
    """Start a child in its own session: a terminal Ctrl-C reaches only the supervisor, which
    then stops the children in order instead of all of them racing to exit at once."""
    parent = os.getpid()
    return subprocess.Popen(
        list(argv),
        env=dict(env) if env is not None else None,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
        preexec_fn=lambda: _die_with_parent(parent),
    )


def alive(proc: psutil.Process) -> bool:
    """True while the process runs; a zombie counts as gone (it holds no resources and its
    parent, possibly init, reaps it when it gets to it)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(procs: Iterable[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait up to `timeout` seconds; return the processes still alive."""
    pending = list(procs)
    deadline = time.monotonic() + timeout
    while True:
        for p in pending:
            # Reap our own children so they do not linger as zombies.
            with contextlib.suppress(psutil.Error, ChildProcessError):
                p.wait(timeout=0)
        pending = [p for p in pending if alive(p)]
        if not pending or time.monotonic() >= deadline:
            return pending
        time.sleep(0.1)


def tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants, parent first; empty if it is gone."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_all(procs: Iterable[psutil.Process]) -> None:
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()


def terminate_tree(pid: int, timeout: float, sig: int = signal.SIGTERM) -> list[psutil.Process]:
    """Send `sig` to the process, give it `timeout` seconds to stop itself and its
    descendants, then SIGKILL whatever is left. Returns the processes that had to be killed."""
    procs = tree(pid)
    if not procs:
        return []
    with contextlib.suppress(psutil.Error):
        procs[0].send_signal(sig)
    survivors = wait_gone(procs, timeout)
    # Children started after the snapshot (a worker restarting) are caught here.
    survivors += [p for p in tree(pid) if p not in survivors]
    kill_all(survivors)
    wait_gone(survivors, 5)
    return survivors
