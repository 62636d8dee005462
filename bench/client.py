"""Talking to the product over HTTP (httpx), as a client would, with a bearer API key: async
submission (`Prefer: respond-async` → 202 + Content-Location), job polling (`GET /jobs/<id>`, or
one `GET /jobs` page for many jobs), cancel (`DELETE` on the status URL), and synchronous
bundles.
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

    def __init__(self, origin: str, token: str, *, connections: int = 64) -> None:
        self.origin = origin
        self.http = httpx.AsyncClient(
            base_url=origin,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(600, connect=10),
            limits=httpx.Limits(max_connections=connections,
                                max_keepalive_connections=connections),
            trust_env=False,
        )
        self.retries = 0  # requests sent again on a fresh connection (see _request)

    async def close(self) -> None:
        await self.http.aclose()

    async def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One request, sent again once if it went out on a kept-alive connection that the
        server closed meanwhile (gunicorn drops idle ones after 2 s; the request never reached
        the application)."""
        try:
            return await self.http.request(method, url, **kwargs)
        except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
            self.retries += 1
            return await self.http.request(method, url, **kwargs)

    # ------------------------------------------------------------------ submission

    async def submit(self, method: str, body: bytes, *, content_type: str = FHIR_JSON,
                     prefer_return: str | None = None) -> Submitted:
        prefer = "respond-async" + (f", return={prefer_return}" if prefer_return else "")
        headers = {"Content-Type": content_type, "Prefer": prefer}
        t0 = time.monotonic()
        resp = await self._request(method, "/fhir", content=body, headers=headers)
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
        resp = await self._request("POST", "/fhir", content=body,
                                   headers={"Content-Type": FHIR_JSON,
                                            "Prefer": "return=minimal"})
        elapsed = time.monotonic() - t0
        _check(resp, 200, "synchronous transaction")
        return elapsed

    # ------------------------------------------------------------------ jobs

    async def job(self, sub: Submitted) -> Job:
        resp = await self._request("GET", f"/jobs/{sub.job_id}")
        _check(resp, 200, f"GET /jobs/{sub.job_id}")
        return _job(orjson.loads(resp.content))

    async def jobs(self, subs: list[Submitted]) -> dict[str, Job]:
        """The state of many jobs: one `GET /jobs` page (the client's own jobs, newest first),
        or one request per job when they are not all on it."""
        if len(subs) > 1:
            resp = await self._request("GET", "/jobs", params={"_count": 1000})
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
        resp = await self._request("DELETE", sub.status_url)
        if resp.status_code not in (202, 404):
            raise BenchClientError(f"cancel {sub.job_id}: HTTP {resp.status_code}: {resp.text}")
