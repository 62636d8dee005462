"""`core` does not depend on the task queue: no module of it imports Celery (or its kombu and
billiard), directly or through another module; the worker translates Celery's soft time limit
into core's `TimeLimitExceeded` at its edge."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "core"
TASK_QUEUE = ("celery", "kombu", "billiard", "amqp", "vine")


def _core_modules() -> list[str]:
    """Every importable module of `core`, but Alembic's revision scripts (run by Alembic)."""
    names = []
    for path in sorted(CORE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        if "migrations" in rel.parts:
            continue
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        names.append(".".join(parts))
    return names


def test_no_core_module_imports_the_task_queue() -> None:
    offenders = []
    for path in sorted(CORE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}"
                          for n in names if n.split(".")[0] in TASK_QUEUE]
    assert not offenders, "\n".join(offenders)


def test_importing_all_of_core_loads_no_task_queue() -> None:
    """Transitively too: a fresh interpreter imports every module of `core` and then finds no
    Celery in sys.modules."""
    modules = _core_modules()
    assert "core.jobs.runner" in modules and "core.store.retry" in modules
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({TASK_QUEUE!r})))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="no SIGUSR1 on this platform")
def test_the_soft_time_limit_raises_what_core_catches() -> None:
    """Where the pool process has installed its soft-limit handler, the worker replaces it, and
    the real signal then raises an exception that both `core` and Celery recognise."""
    from billiard import pool as billiard_pool
    from celery.exceptions import SoftTimeLimitExceeded

    from core.jobs import TimeLimitExceeded
    from worker.tasks import translate_time_limits

    saved = signal.signal(signal.SIGUSR1, billiard_pool.soft_timeout_sighandler)
    try:
        translate_time_limits()
        with pytest.raises(TimeLimitExceeded) as raised:
            signal.raise_signal(signal.SIGUSR1)
        assert isinstance(raised.value, SoftTimeLimitExceeded)

        # Outside a pool process the signal keeps whatever handler it had.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        translate_time_limits()
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR1, saved)
