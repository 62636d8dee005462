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
    "Target",
    "percentile",
    "render_markdown",
    "render_pg_activity",
    "render_tables",
    "render_targets",
    "render_targets_markdown",
    "series_from_json",
    "summary_markdown",
    "targets",
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
    "transactions_per_s": ("tx/s", 0),
    "offered_per_s": ("offered tx/s", 0),
    "send_lag_p99_ms": ("client send lag p99 ms", 1),
    "store_resources": ("store resources", 0),
    "build_s": ("store build s", 0),
    "bytes_per_resource": ("disk B/resource", 0),
    "search_identifier_ms": ("search by identifier ms", 1),
    "search_date_ms": ("search by date ms", 1),
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


# --------------------------------------------------------------------------- issue targets

# The in-memory peer of the issue (Medplum's fhir-router, no database) on this machine.
PEER_RESOURCES_PER_S = 2_300
W3_TARGET = 5_000
W5_P99_MS = 50.0
W7_OVER_EMPTY = 0.8
W7_STORE = 10_000_000
W1_OVER_COPY = 0.8
RSS_OVER_BODY = 2.0
UPLOAD_MB = 200


@dataclass(frozen=True)
class Target:
    """One target of the issue on one run: what was asked, what was measured against which
    baseline, and whether it was met (None: the workload did not run)."""

    name: str
    target: str
    measured: str
    baseline: str
    met: bool | None


def _find(series: list[Series], workload: str, *labels: str) -> Series | None:
    """The first series of `workload` whose label starts with one of `labels`, in that order
    of preference (no labels: the first of the workload)."""
    group = [s for s in series if s.workload == workload]
    for label in labels:
        for s in group:
            if s.label.startswith(label):
                return s
    return group[0] if group and not labels else None


def _not_run(name: str, target: str, why: str) -> Target:
    return Target(name, target, why, "–", None)


def _w1(series: list[Series]) -> Target:
    name, goal = "W1 async batch of 100k creates", f"≥ {W1_OVER_COPY}× COPY"
    s = _find(series, "W1", "100,000 creates") or _find(series, "W1")
    if s is None or s.ratio is None:
        return _not_run(name, goal, "W1 not run")
    size = "" if s.label.startswith("100,000") else f" (at {s.label}: not the target's size)"
    return Target(name, goal, f"{s.ratio:.2f}× ({_n(s.median)} entries/s){size}",
                  f"COPY {_n(s.baseline_median)} rows/s", s.ratio >= W1_OVER_COPY and not size)


def _w3(series: list[Series]) -> Target:
    name, goal = "W3 Synthea transactions", f"≥ {W3_TARGET:,} resources/s"
    s = _find(series, "W3", "20 patient transactions")
    which = "real Synthea"
    if s is None:
        s, which = _find(series, "W3", ""), "Synthea-like (run --synthea for the real ones)"
    if s is None:
        return _not_run(name, goal, "W3 not run")
    peer = s.median / PEER_RESOURCES_PER_S
    return Target(name, goal, f"{_n(s.median)} resources/s, {which}",
                  f"in-memory peer ~{PEER_RESOURCES_PER_S:,}/s ({peer:.1f}×); "
                  f"COPY {_n(s.baseline_median)} rows/s", s.median >= W3_TARGET)


def _w5(series: list[Series]) -> Target:
    name, goal = "W5 sync 10-entry transactions", f"p99 ≤ {W5_P99_MS:g} ms at half of peak"
    half = _find(series, "W5", "open loop at half of peak")
    peak = _find(series, "W5", "peak")
    if half is None or peak is None:
        return _not_run(name, goal, "W5 not run")
    p50, p99 = half.median_of(lambda r: r.p50_ms), half.median_of(lambda r: r.p99_ms)
    return Target(name, goal,
                  f"p99 {_ms(p99)} ms (p50 {_ms(p50)}) at {_n(half.extra('offered_per_s'))} "
                  f"tx/s offered", f"peak {_n(peak.extra('transactions_per_s'))} tx/s "
                  f"(p99 {_ms(peak.median_of(lambda r: r.p99_ms))} ms saturated)",
                  p99 is not None and p99 <= W5_P99_MS)


def _w7(series: list[Series]) -> Target:
    """W7's series: the loaded store's rate over the empty store's, as its runs' extra
    `over_empty`, or else from a series whose label mentions the empty store and another."""
    name, goal = "W7 load into a 10M-resource store", f"≥ {W7_OVER_EMPTY}× empty-store rate"
    group = [s for s in series if s.workload == "W7"]
    if not group:
        return _not_run(name, goal, "W7 not run")
    loaded = next((s for s in group if s.extra("over_empty") is not None), None)
    empty = next((s for s in group if "empty" in s.label.lower()), None)
    if loaded is not None:
        over = loaded.extra("over_empty") or 0.0
    else:
        loaded = next((s for s in group if s is not empty), None)
        if loaded is None or empty is None or not empty.median:
            return _not_run(name, goal, "W7 ran without an empty-store rate")
        over = loaded.median / empty.median
    base = f"empty store {_n(empty.median)} {empty.unit}" if empty is not None else "empty store"
    store = loaded.extra("store_resources")
    short = store is not None and store < W7_STORE * 0.95
    size = f" (a store of {store:,.0f}: not the target's size)" if short else ""
    return Target(name, goal, f"{over:.2f}× ({_n(loaded.median)} {loaded.unit}){size}",
                  base, over >= W7_OVER_EMPTY and not short)


def _memory(series: list[Series]) -> Target:
    name, goal = f"API memory, {UPLOAD_MB} MB upload", f"RSS ≤ {RSS_OVER_BODY:g}× body"
    s = _find(series, "W4")
    over, body = (s.extra("api_rss_over_body"), s.extra("body_mb")) if s else (None, None)
    if over is None or body is None:
        return _not_run(name, goal, "W4 not run")
    short = body < UPLOAD_MB * 0.95
    size = f" (at {body:,.0f} MB: not the target's size)" if short else ""
    return Target(name, goal, f"{over:.2f}× the body{size}",
                  f"body {body:,.0f} MB, largest API process {over * body:,.0f} MB",
                  over <= RSS_OVER_BODY and not short)


def targets(series: list[Series]) -> list[Target]:
    """The issue's targets, each from the series of this run that measures it."""
    return [_w1(series), _w3(series), _w5(series), _w7(series), _memory(series)]


def _verdict(t: Target) -> str:
    return "not run" if t.met is None else ("met" if t.met else "MISSED")


def render_targets(series: list[Series], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="Targets (issue 11), this run", title_justify="left")
    for column in ("target", "asked", "measured", "baseline", ""):
        table.add_column(column)
    for t in targets(series):
        table.add_row(t.name, t.target, t.measured, t.baseline, _verdict(t))
    console.print(table)


def render_targets_markdown(series: list[Series]) -> str:
    lines = ["| target | asked | measured | baseline | |", "| --- | --- | --- | --- | --- |"]
    for t in targets(series):
        lines.append(f"| {t.name} | {t.target} | {t.measured} | {t.baseline} | "
                     f"**{_verdict(t)}** |")
    return "\n".join(lines) + "\n"


def summary_markdown(series: list[Series]) -> str:
    """What `--markdown` writes (the README's Performance tables): the workloads, then the
    targets."""
    return render_markdown(series) + "\n" + render_targets_markdown(series)
