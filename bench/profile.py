"""Sampling profiles of the product's processes during a measured run, with py-spy.

`Profiler.start` attaches one `py-spy record --format raw` to every API worker and Celery pool
process; `stop` interrupts them (py-spy then writes its collapsed stacks) and sums the samples per
process group into a `Profile`: the functions where the time is spent (self) and the project
functions that time is spent under (inclusive), with their share of all samples. The raw files
stay in the output directory for flame graphs.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from runtime import procutil

__all__ = ["Profile", "Profiler", "py_spy"]

# "function (path/to/file.py:123)" → function, file
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")
_PROJECT = ("/core/", "/api/", "/worker/")
_ROOT = str(Path(__file__).resolve().parents[1]) + "/"  # the checkout the product runs from


def py_spy() -> str | None:
    found = shutil.which("py-spy")
    if found:
        return found
    candidate = Path(sys.executable).with_name("py-spy")
    return str(candidate) if candidate.exists() else None


def _short(frame: str) -> str:
    """`execute (/…/site-packages/sqlalchemy/engine/base.py:1418)` → `sqlalchemy/engine/base.py:
    execute`; project files keep their path from the package root."""
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m.group("file")
    for marker in ("site-packages/", "/lib/python3", _ROOT):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/lib/python3":
                path = "stdlib/" + path.split("/", 1)[-1]
            break
    for root in _PROJECT:
        if root in path:
            path = root.strip("/") + "/" + path.split(root, 1)[1]
            break
    return f"{path}:{m.group('func')}"


@dataclass
class Profile:
    group: str
    samples: int = 0
    self_time: Counter[str] = field(default_factory=Counter)
    inclusive: Counter[str] = field(default_factory=Counter)  # project functions only

    def add_raw(self, text: str) -> None:
        for line in text.splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            frames = [_short(f) for f in stack.split(";")]
            # py-spy puts the process / thread as the first frames: keep code frames only.
            frames = [f for f in frames if ":" in f]
            if not frames:
                continue
            self.samples += n
            self.self_time[frames[-1]] += n
            for f in set(frames):
                if f.startswith(("core/", "api/", "worker/")):
                    self.inclusive[f] += n

    def top(self, counter: Counter[str], n: int) -> list[tuple[str, float]]:
        return [(k, v / self.samples) for k, v in counter.most_common(n)] if self.samples else []

    def as_json(self, n: int = 25) -> dict[str, object]:
        return {
            "group": self.group,
            "samples": self.samples,
            "self": [[k, round(v, 4)] for k, v in self.top(self.self_time, n)],
            "inclusive": [[k, round(v, 4)] for k, v in self.top(self.inclusive, n)],
        }

    def text(self, n: int = 20) -> str:
        lines = [f"{self.group}: {self.samples} samples", "  self time:"]
        lines += [f"    {v * 100:5.1f}%  {k}" for k, v in self.top(self.self_time, n)]
        lines.append("  inclusive (project functions):")
        lines += [f"    {v * 100:5.1f}%  {k}" for k, v in self.top(self.inclusive, n)]
        return "\n".join(lines)


@dataclass
class _Recording:
    group: str
    pid: int
    output: Path
    proc: subprocess.Popen[bytes]


class Profiler:
    def __init__(self, out_dir: Path, rate: int = 100) -> None:
        exe = py_spy()
        if exe is None:
            raise RuntimeError("py-spy is not installed: pip install 'fhirq[bench]'")
        self.exe = exe
        self.out_dir = out_dir
        self.rate = rate
        self._recordings: list[_Recording] = []

    def start(self, label: str, roots: dict[str, int]) -> None:
        """Profile the leaf processes (gunicorn / Celery pool workers) under each root pid."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for group, root in roots.items():
            for proc in procutil.tree(root)[1:]:
                out = self.out_dir / f"{label}-{group}-{proc.pid}.txt"
                argv = [self.exe, "record", "--pid", str(proc.pid), "--rate", str(self.rate),
                        "--format", "raw", "--nonblocking", "--output", str(out)]
                p = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                self._recordings.append(_Recording(group, proc.pid, out, p))

    def stop(self) -> dict[str, Profile]:
        for r in self._recordings:
            with contextlib.suppress(ProcessLookupError):
                r.proc.send_signal(signal.SIGINT)
        profiles: dict[str, Profile] = {}
        for r in self._recordings:
            try:
                r.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                r.proc.kill()
                r.proc.wait()
            if r.output.exists():
                prof = profiles.setdefault(r.group, Profile(r.group))
                prof.add_raw(r.output.read_text(errors="replace"))
        self._recordings = []
        return profiles
