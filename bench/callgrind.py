"""Instructions per entry of `bench.inprocess`, counted by callgrind in the measured run only:
a figure that a busy machine does not move, for A/B comparisons of the worker's CPU.

    python -m bench.callgrind --entries 2000
    python -m bench.callgrind --synthea

Needs valgrind and a C compiler (the two client requests that start and stop counting are C
macros from valgrind's callgrind.h): the shim is built into a temporary directory on each run.
Everything outside the measured run executes uninstrumented (about 5× slower than native, the
measured part about 50×). Other arguments go to `bench.inprocess` (`--gc-freeze --no-profile`
are always passed).
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["main"]

_SHIM = """
#include <valgrind/callgrind.h>
void start(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION;
                   CALLGRIND_TOGGLE_COLLECT; }
void stop(void) { CALLGRIND_TOGGLE_COLLECT; CALLGRIND_DUMP_STATS_AT("measured");
                  CALLGRIND_STOP_INSTRUMENTATION; }
"""


def _build(directory: Path) -> Path:
    source, shim = directory / "shim.c", directory / "libshim.so"
    source.write_text(_SHIM)
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(shim), str(source)], check=True)
    return shim


def _inside(shim: str, argv: list[str]) -> None:
    """In the process valgrind runs: bench.inprocess, counting only inside its accounting."""
    import bench.inprocess as inprocess

    lib = ctypes.CDLL(shim)
    measured = inprocess.accounting

    @contextmanager
    def counted(engine: Any) -> Iterator[Any]:
        with measured(engine) as acc:
            lib.start()
            try:
                yield acc
            finally:
                lib.stop()

    inprocess.accounting = counted  # type: ignore[assignment]
    sys.argv = ["bench.inprocess", *argv]
    inprocess.main()


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--inside":
        _inside(sys.argv[2], sys.argv[3:])
        return
    argv = [*sys.argv[1:], "--gc-freeze", "--no-profile"]
    if "--database" not in argv:
        argv += ["--database", "fhirq_bench_callgrind"]
    with tempfile.TemporaryDirectory() as tmp:
        shim = _build(Path(tmp))
        out = Path(tmp) / "callgrind.out"
        run = subprocess.run(
            ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-atstart=no",
             f"--callgrind-out-file={out}", sys.executable, "-m", "bench.callgrind",
             "--inside", str(shim), *argv],
            capture_output=True, text=True, env=os.environ,
        )
        report = run.stdout
        dumps = sorted(Path(tmp).glob("callgrind.out.*"))
        if run.returncode != 0 or not dumps:
            sys.exit(f"callgrind run failed:\n{run.stderr[-3000:]}")
        total = int(re.search(r"^summary: (\d+)", dumps[-1].read_text(), re.M).group(1))  # type: ignore[union-attr]
    entries = int(re.search(r"^([\d,]+) entries in", report, re.M).group(1).replace(",", ""))  # type: ignore[union-attr]
    print(report.split("  SQL round trips")[0].rstrip())
    print(f"instructions in the measured run: {total:,} = {total / entries:,.0f} per entry")


if __name__ == "__main__":
    main()
