"""Talking to the product over HTTP (httpx), as a client would: async submission
(`Prefer: respond-async` → 202 + Content-Location), job polling (`GET /jobs/<id>`, falling back
to `HEAD` on the FHIR status URL), cancel, and synchronous bundles.

A build whose API does not mount the job routes yet can still be measured: with `db_url` given,
the job's row is read from PostgreSQL (the system of record the routes read too).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

__all__ = ["BenchClientError", "Job", "JobClient", "Submitted"]

FHIR_JSON = "application/fhir+json"
TERMINAL = ("completed", "failed", "cancelled")


class BenchClientError(RuntimeError):
    """The product answered something a benchmark cannot go on with."""


@dataclass
class Submitted:
    job_id: str
    status_url: str
    accept_seconds: float  # request start → 202 received
    sent_at: float  # time.monotonic() when the request started


@dataclass
class Job:
    job_id: str
    state: str
    total: int | None = None
    done: int | None = None
    failed: int | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


def _job(body: dict[str, Any]) -> Job:
    counts = body.get("counts") or {}
    return Job(body["id"], body["state"], counts.get("total"), counts.get("done"),
               counts.get("failed"), body)


def _check(resp: httpx.Response, expected: int, what: str) -> None:
    if resp.status_code != expected:
        raise BenchClientError(f"{what}: HTTP {resp.status_code}: {resp.text[:2000]}")


class JobClient:
    """One asyncio httpx client for a benchmark's whole life."""

    def __init__(self, origin: str, *, connections: int = 64, db_url: str | None = None) -> None:
        self.origin = origin
        self.db_url = db_url
        self._mode: str | None = None  # "jobs" (GET /jobs/<id>), "status" (HEAD), "db"
        self.http = httpx.AsyncClient(
            base_url=origin,
            timeout=httpx.Timeout(600, connect=10),
            limits=httpx.Limits(max_connections=connections,
                                max_keepalive_connections=connections),
            trust_env=False,
        )

    async def close(self) -> None:
        await self.http.aclose()

    # ------------------------------------------------------------------ submission

    async def submit(self, method: str, body: bytes, *, content_type: str = FHIR_JSON,
                     prefer_return: str | None = None) -> Submitted:
        prefer = "respond-async" + (f", return={prefer_return}" if prefer_return else "")
        headers = {"Content-Type": content_type, "Prefer": prefer}
        t0 = time.monotonic()
        resp = await self.http.request(method, "/fhir", content=body, headers=headers)
        elapsed = time.monotonic() - t0
        _check(resp, 202, f"async {method} /fhir")
        url = resp.headers.get("Content-Location", "")
        job_id = resp.headers.get("X-Job-Id") or url.rstrip("/").rsplit("/", 1)[-1]
        if not job_id:
            raise BenchClientError("the 202 named no job (no Content-Location)")
        return Submitted(job_id, url, elapsed, t0)

    async def transaction(self, body: bytes) -> float:
        """A synchronous transaction; returns its latency in seconds."""
        t0 = time.monotonic()
        resp = await self.http.post("/fhir", content=body,
                                    headers={"Content-Type": FHIR_JSON,
                                             "Prefer": "return=minimal"})
        elapsed = time.monotonic() - t0
        _check(resp, 200, "synchronous transaction")
        return elapsed

    # ------------------------------------------------------------------ jobs

    async def _detect(self, sub: Submitted) -> None:
        """How this build reports jobs, found on the first poll of a fresh job."""
        if (await self.http.get(f"/jobs/{sub.job_id}")).status_code == 200:
            self._mode = "jobs"
        elif (await self.http.head(sub.status_url)).status_code != 404:
            self._mode = "status"
        elif self.db_url is not None:
            self._mode = "db"
        else:
            raise BenchClientError("the API serves neither /jobs/<id> nor the status URL")

    async def job(self, sub: Submitted) -> Job:
        if self._mode is None:
            await self._detect(sub)
        if self._mode == "jobs":
            resp = await self.http.get(f"/jobs/{sub.job_id}")
            _check(resp, 200, f"GET /jobs/{sub.job_id}")
            return _job(orjson.loads(resp.content))
        if self._mode == "status":
            # HEAD: the status without streaming the response Bundle.
            resp = await self.http.head(sub.status_url)
            state = {202: "running", 200: "completed", 404: "cancelled"}.get(
                resp.status_code, "failed")
            return Job(sub.job_id, state)
        return await asyncio.to_thread(self._job_from_db, sub.job_id)

    def _job_from_db(self, job_id: str) -> Job:
        import psycopg2

        assert self.db_url is not None
        conn = psycopg2.connect(self.db_url)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT state, total, done, failed, outcome FROM job WHERE id = %s",
                            (job_id,))
                row = cur.fetchone()
        finally:
            conn.close()
        if row is None:
            raise BenchClientError(f"job {job_id} is not in the database")
        return Job(job_id, row[0], row[1], row[2], row[3], {"outcome": row[4]})

    async def jobs(self, subs: list[Submitted]) -> dict[str, Job]:
        """The state of many jobs: one `GET /jobs` page when the JSON API exists."""
        if self._mode is None and subs:
            await self._detect(subs[0])
        if self._mode == "jobs":
            resp = await self.http.get("/jobs", params={"_count": 1000})
            _check(resp, 200, "GET /jobs")
            out = {b["id"]: _job(b) for b in orjson.loads(resp.content)["jobs"]}
            wanted = {s.job_id for s in subs}
            if wanted <= out.keys():
                return {k: v for k, v in out.items() if k in wanted}
        jobs = await asyncio.gather(*(self.job(s) for s in subs))
        return {j.job_id: j for j in jobs}

    async def wait(self, sub: Submitted, *, timeout: float, interval: float = 0.1) -> Job:
        """Poll until the job ends; `raw['_seen_at']` is when its end was first seen."""
        done = await self.wait_all([sub], timeout=timeout, interval=interval)
        return done[sub.job_id]

    async def wait_all(self, subs: list[Submitted], *, timeout: float, interval: float = 0.2
                       ) -> dict[str, Job]:
        """Poll until every job ends. Each job's `raw['_seen_at']` is the monotonic time its
        end was first seen (the client's view of its completion)."""
        deadline = time.monotonic() + timeout
        finished: dict[str, Job] = {}
        while True:
            pending = [s for s in subs if s.job_id not in finished]
            if not pending:
                return finished
            for job_id, job in (await self.jobs(pending)).items():
                if job.terminal:
                    job.raw["_seen_at"] = time.monotonic()
                    finished[job_id] = job
            if len(finished) < len(subs):
                if time.monotonic() > deadline:
                    raise BenchClientError(
                        f"{len(subs) - len(finished)} job(s) did not finish within {timeout:.0f} s"
                    )
                await asyncio.sleep(interval)

    async def cancel(self, sub: Submitted) -> None:
        if self._mode == "db":
            await asyncio.to_thread(self._cancel_in_db, sub.job_id)
            return
        resp = await self.http.delete(sub.status_url)
        if resp.status_code not in (202, 404):
            raise BenchClientError(f"cancel {sub.job_id}: HTTP {resp.status_code}: {resp.text}")

    def _cancel_in_db(self, job_id: str) -> None:
        from core.jobs import cancel_job
        from core.store.db import get_engine

        with get_engine(self.db_url).begin() as conn:
            cancel_job(conn, job_id, "anonymous")
