"""Results: what one measured run and one series of runs hold, their JSON form (the results file
the README table is regenerated from), and their rendering as rich tables and as Markdown.

A *series* is one workload at one size and configuration, run `n` times; it reports the median,
min and max of its rate, the median of its baselines (COPY of the same rows, measured right after
each run), and the median of the runs' ratios.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = [
    "Run",
    "Series",
    "percentile",
    "render_markdown",
    "render_pg_activity",
    "render_tables",
    "series_from_json",
]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between closest ranks."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class Run:
    """One measured run."""

    size: int  # entries (resources) it processed
    seconds: float  # wall time of the measured part
    rate: float  # size / seconds
    p50_ms: float | None = None
    p99_ms: float | None = None
    usage: dict[str, Any] = field(default_factory=dict)  # monitor.Usage.as_json()
    extra: dict[str, float] = field(default_factory=dict)  # workload-specific figures
    baseline: float | None = None  # COPY rows/s of the same rows, measured right after

    @property
    def ratio(self) -> float | None:
        return self.rate / self.baseline if self.baseline else None


@dataclass
class Series:
    workload: str  # "W1"
    title: str  # what the workload is
    label: str  # this series: size and configuration
    unit: str  # "entries/s" or "resources/s"
    runs: list[Run] = field(default_factory=list)
    baseline: list[float] = field(default_factory=list)  # COPY rows/s, one per run
    target: str | None = None
    met: bool | None = None
    note: str = ""

    # ------------------------------------------------------------------ statistics

    def _rates(self) -> list[float]:
        return [r.rate for r in self.runs]

    @property
    def median(self) -> float:
        return statistics.median(self._rates())

    @property
    def low(self) -> float:
        return min(self._rates())

    @property
    def high(self) -> float:
        return max(self._rates())

    @property
    def baseline_median(self) -> float | None:
        return statistics.median(self.baseline) if self.baseline else None

    @property
    def ratio(self) -> float | None:
        """The median of the runs' own ratios (each run against the COPY measured right after
        it), so that a busy moment of the machine weighs on both sides of a ratio."""
        ratios = [r.ratio for r in self.runs if r.ratio is not None]
        if ratios:
            return statistics.median(ratios)
        base = self.baseline_median
        return self.median / base if base else None

    def median_of(self, get: Any) -> float | None:
        values = [v for v in (get(r) for r in self.runs) if v is not None]
        return statistics.median(values) if values else None

    def extra(self, key: str) -> float | None:
        return self.median_of(lambda r: r.extra.get(key))

    def rss(self, group: str) -> float | None:
        """Peak RSS of a process tree, the largest over the runs."""
        values = [r.usage.get("rss_mb", {}).get(group) for r in self.runs]
        values = [v for v in values if v is not None]
        return max(values) if values else None

    def cpu_share(self) -> dict[str, float]:
        """Each process group's share of the machine's CPU time during the runs (all cores:
        worker, postgres, api, bench client, other processes, iowait, idle)."""
        totals: dict[str, float] = {}
        for r in self.runs:
            for k, v in r.usage.get("cpu_s", {}).items():
                totals[k] = totals.get(k, 0.0) + v
        whole = sum(totals.values())
        return {k: v / whole for k, v in totals.items()} if whole else {}

    def cpu_per_entry(self) -> dict[str, float]:
        """CPU microseconds per entry by process group, over all runs: unlike rates, hardly
        moved by what else the machine is doing."""
        totals: dict[str, float] = {}
        entries = sum(r.size for r in self.runs)
        for r in self.runs:
            for k, v in r.usage.get("cpu_s", {}).items():
                totals[k] = totals.get(k, 0.0) + v
        if not entries or not totals:
            return {}
        return {k: totals.get(k, 0.0) / entries * 1e6 for k in ("worker", "postgres", "api")}

    def pg_activity(self, n: int = 8) -> list[tuple[str, float]]:
        """What the database's sessions were busy with (sampled), as shares of all samples."""
        totals: dict[str, int] = {}
        for r in self.runs:
            for k, v in r.usage.get("pg_activity", {}).items():
                totals[k] = totals.get(k, 0) + v
        whole = sum(totals.values())
        top = sorted(totals.items(), key=lambda kv: -kv[1])[:n]
        return [(k, v / whole) for k, v in top] if whole else []

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["summary"] = {
            "median": self.median, "min": self.low, "max": self.high,
            "baseline_median": self.baseline_median, "ratio": self.ratio,
            "p50_ms": self.median_of(lambda r: r.p50_ms),
            "p99_ms": self.median_of(lambda r: r.p99_ms),
            "rss_api_mb": self.rss("api"), "rss_worker_mb": self.rss("worker"),
            "cpu_share": self.cpu_share(),
            "cpu_us_per_entry": self.cpu_per_entry(),
            "pg_activity": self.pg_activity(),
        }
        return out


def series_from_json(data: dict[str, Any]) -> Series:
    runs = [Run(**r) for r in data["runs"]]
    fields = {k: v for k, v in data.items() if k not in ("runs", "summary")}
    return Series(runs=runs, **fields)


# --------------------------------------------------------------------------- formatting

def _n(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def _ms(value: float | None) -> str:
    return "–" if value is None else (f"{value:,.0f}" if value >= 100 else f"{value:.1f}")


def _met(s: Series) -> str:
    if s.met is None:
        return ""
    return "met" if s.met else "MISSED"


# Extra figures shown when a series has them: key → (column, digits).
EXTRA_COLUMNS = {
    "accept_s": ("accept s", 2),
    "parse_s": ("orjson.loads s", 2),
    "parse_nogc_s": ("… gc off s", 2),
    "accept_over_parse": ("accept ÷ parse", 1),
    "body_mb": ("body MB", 0),
    "api_rss_over_body": ("API RSS ÷ body", 2),
    "api_rss_growth_mb": ("API RSS growth MB", 0),
    "setup_s": ("setup s", 1),
}


CPU_GROUPS = ("worker", "postgres", "api", "bench client", "other processes", "idle")
CPU_HEADER = "CPU % worker/pg/api/client/other/idle"
PER_ENTRY_HEADER = "CPU µs/entry worker/pg/api"


def _per_entry_text(s: Series) -> str:
    per = s.cpu_per_entry()
    return "/".join(f"{per[k]:.0f}" for k in ("worker", "postgres", "api")) if per else "–"


def _cpu_text(s: Series) -> str:
    share = s.cpu_share()
    if not share:
        return "–"
    # Time waiting for the disk counts as idle: no core was working for anyone.
    share["idle"] = share.get("idle", 0) + share.get("iowait", 0)
    return "/".join(f"{share.get(k, 0) * 100:.0f}" for k in CPU_GROUPS)


def render_pg_activity(series: list[Series], console: Console) -> None:
    for s in series:
        top = s.pg_activity()
        if top:
            console.print(f"  [bold]{s.workload} {s.label}[/bold]: database sessions, sampled")
            for label, share in top:
                console.print(f"    {share * 100:5.1f}%  {label}")


def render_tables(series: list[Series], console: Console | None = None) -> None:
    console = console or Console()
    by_workload: dict[str, list[Series]] = {}
    for s in series:
        by_workload.setdefault(s.workload, []).append(s)
    for workload, group in by_workload.items():
        table = Table(title=f"{workload}: {group[0].title}", title_justify="left",
                      show_lines=False)
        table.add_column("series")
        table.add_column("runs", justify="right")
        table.add_column(f"{group[0].unit} median", justify="right")
        table.add_column("min", justify="right")
        table.add_column("max", justify="right")
        table.add_column("COPY rows/s", justify="right")
        table.add_column("ratio", justify="right")
        latency = any(s.median_of(lambda r: r.p50_ms) is not None for s in group)
        if latency:
            table.add_column("p50 ms", justify="right")
            table.add_column("p99 ms", justify="right")
        extras = [k for k in EXTRA_COLUMNS if any(s.extra(k) is not None for s in group)]
        for k in extras:
            table.add_column(EXTRA_COLUMNS[k][0], justify="right")
        table.add_column("peak RSS MB API / worker", justify="right")
        table.add_column(PER_ENTRY_HEADER, justify="right")
        table.add_column(CPU_HEADER, justify="right")
        table.add_column("target")
        for s in group:
            row = [s.label, str(len(s.runs)), _n(s.median), _n(s.low), _n(s.high),
                   _n(s.baseline_median), _n(s.ratio, 2)]
            if latency:
                row += [_ms(s.median_of(lambda r: r.p50_ms)),
                        _ms(s.median_of(lambda r: r.p99_ms))]
            row += [_n(s.extra(k), EXTRA_COLUMNS[k][1]) for k in extras]
            row += [f"{_n(s.rss('api'))} / {_n(s.rss('worker'))}", _per_entry_text(s),
                    _cpu_text(s),
                    f"{s.target} {_met(s)}" if s.target else ""]
            table.add_row(*row)
        console.print(table)
        for s in group:
            if s.note:
                console.print(f"  [dim]{s.label}: {s.note}[/dim]")


def render_markdown(series: list[Series]) -> str:
    """One summary table for the README."""
    lines = [
        "| workload | series | runs | rate median (min–max) | COPY rows/s | ratio | "
        f"p50 / p99 ms | peak RSS MB API / worker | {PER_ENTRY_HEADER} | {CPU_HEADER} | target |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for s in series:
        p50, p99 = s.median_of(lambda r: r.p50_ms), s.median_of(lambda r: r.p99_ms)
        latency = f"{_ms(p50)} / {_ms(p99)}" if p50 is not None else "–"
        rate = f"{_n(s.median)} {s.unit} ({_n(s.low)}–{_n(s.high)})"
        extras = [f"{EXTRA_COLUMNS[k][0]} {_n(s.extra(k), EXTRA_COLUMNS[k][1])}"
                  for k in EXTRA_COLUMNS if s.extra(k) is not None]
        label = s.label + (" — " + ", ".join(extras) if extras else "")
        target = f"{s.target}: **{_met(s)}**" if s.target else ""
        lines.append(
            f"| {s.workload} | {label} | {len(s.runs)} | {rate} | {_n(s.baseline_median)} | "
            f"{_n(s.ratio, 2)} | {latency} | {_n(s.rss('api'))} / {_n(s.rss('worker'))} | "
            f"{_per_entry_text(s)} | {_cpu_text(s)} | {target} |"
        )
    return "\n".join(lines) + "\n"
