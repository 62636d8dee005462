"""The network cut: workers on two "hosts" (network namespaces of the test's own, joined by
veth pairs to a third that runs PostgreSQL and Redis); mid-job one host's link goes down, and
the job must complete on the other with every entry taking effect exactly once, within
RECOVERY_BOUND of the cut. The worker cut off is not told: its TCP connections just go silent.

So that the cut always strikes a chunk in flight (the hard case: its PostgreSQL session is left
idle in transaction, holding the chunk's lock), host a's worker honours the test-only `sleep`
marker (core.jobs.faults) carried by one entry of every hundred: its first chunk sleeps until
the cut. Host b's worker ignores the markers, so every entry succeeds there.

Needs root and `ip netns`; skipped, saying why, where either is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

pytest.register_assert_rewrite("tests.fault_helpers")

from sqlalchemy.engine import make_url  # noqa: E402

from core.jobs.chunks import LOCK_CLASS  # noqa: E402
from tests.fault_helpers import (  # noqa: E402
    PostgresServer,
    RedisServer,
    Stack,
    TwoHosts,
    poisoned_batch,
    private_database,
)
from tests.jobs_helpers import WorkerProcess, wait_for  # noqa: E402

pytest_plugins = ["tests.fault_helpers"]  # prints the fault table at the end

pytestmark = [pytest.mark.faults, pytest.mark.slow]

N = 20_000


@pytest.fixture
def hosts() -> Iterator[TwoHosts]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2's `ip`")
    net = TwoHosts()
    try:
        net.create()
    except subprocess.CalledProcessError as exc:
        net.remove()
        pytest.skip(f"network namespaces are not permitted here: {exc.stderr!r}")
    yield net
    net.remove()


def holds_a_chunk(s: Stack, client: str) -> bool:
    """A session from `client` holds a chunk's lock: a chunk runs on that host now."""
    return s.sql(
        "SELECT count(*) > 0 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.classid = :k AND l.granted "
        "AND a.client_addr = CAST(:addr AS inet)", k=LOCK_CLASS, addr=client)


def test_one_of_two_hosts_cut_off_mid_job(hosts: TwoHosts) -> None:
    pg = PostgresServer()
    redis_server: RedisServer | None = None
    workers: dict[str, WorkerProcess] = {}
    try:
        pg.start()
        pg.listen_in(hosts.ns["srv"], (hosts.server("a"), hosts.server("b")), hosts.NETWORK)
        redis_server = RedisServer(False, bind=(hosts.server("a"), hosts.server("b")),
                                   prefix=tuple(hosts.exec("srv"))).start()
        with private_database(pg.url) as url:
            # The API and this test reach both servers on their unix sockets; the workers only
            # over their host's link.
            s = Stack(url, redis_server.url)
            shutil.rmtree(s.worker.dir, ignore_errors=True)  # replaced by the two below
            database = make_url(url).database
            for host in ("a", "b"):
                w = WorkerProcess({}, concurrency=1)
                w.env = {**s.env,
                         "FHIRQ_DATABASE_URL":
                             f"postgresql://postgres@{hosts.server(host)}:5432/{database}",
                         "FHIRQ_REDIS_URL": f"redis://{hosts.server(host)}:6379/0"}
                if host == "a":
                    w.env["FHIRQ_TEST_POISON"] = "1"
                w.prefix = hosts.exec(host)
                workers[host] = w.start()
            s.worker = workers["b"]  # the survivor: its log is the one to read on failure
            s.api.start()
            try:
                job_id = s.submit(poisoned_batch(N, "cut", dict.fromkeys(range(50, N, 100),
                                                                      "sleep")))
                wait_for(lambda: holds_a_chunk(s, hosts.client("a")), 120,
                         "a chunk to run on host a", on_timeout=workers["a"].tail)
                time.sleep(1)
                assert holds_a_chunk(s, hosts.client("a"))
                assert s.done(job_id) < N // 2, "the job was nearly done before the cut"
                t0 = time.time()
                hosts.cut("a")
                s.verdict("network cut: one of two hosts", job_id, "cut", N, t0)
            finally:
                s.close()
    finally:
        for w in workers.values():
            w.kill()
            shutil.rmtree(w.dir, ignore_errors=True)
        if redis_server is not None:
            redis_server.close()
        pg.close()
