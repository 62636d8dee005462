"""The broker as fhirq sees it besides sending tasks: which kind it is, whether it answers
(`/readyz`), how many task messages wait in the job queue (`/metrics`, the reaper), and
emptying or removing a queue (tests, benchmarks).

Redis is read with redis-py (a queue is a few lists; unacknowledged messages a hash), RabbitMQ
with kombu (a passive declare of the queue answers how many messages are ready). Nothing here
imports the Celery app: the API loads this module for its probes.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from functools import lru_cache

import redis
from kombu import Connection

from core.metrics import QueueStats
from core.services import redis_client_url

__all__ = ["Broker", "KombuBroker", "RedisBroker", "broker_for", "kind_of", "queue_keys"]

TIMEOUT = 2.0  # seconds for any one question to the broker
_REDIS = ("redis", "rediss", "redis+socket", "socket", "unix")
_AMQP = ("amqp", "amqps", "pyamqp")


def kind_of(url: str) -> str:
    """`redis`, `rabbitmq`, or the URL's scheme for another transport of kombu's."""
    scheme = url.split("://", 1)[0].lower()
    return "redis" if scheme in _REDIS else "rabbitmq" if scheme in _AMQP else scheme


class Broker(ABC):
    """One broker, by its Celery URL. `kind` names it in `fhirq_metrics_source_up`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.kind = kind_of(url)

    @abstractmethod
    def problem(self) -> str | None:
        """Why the broker cannot be used right now (an exception's name), or None."""

    @abstractmethod
    def queue_stats(self, queue: str) -> QueueStats:
        """Messages waiting in `queue` (and unacknowledged, where the broker says)."""

    @abstractmethod
    def purge(self, queue: str) -> None:
        """Drop every message waiting in `queue`."""

    @abstractmethod
    def delete(self, queue: str) -> None:
        """Remove `queue` and its bindings."""


# kombu's Redis transport keeps a queue's messages of priority p > 0 in `queue\x06\x16p`.
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)
_UNACKED = "unacked"


def queue_keys(queue: str) -> list[str]:
    """The Redis lists holding the messages of a Celery queue."""
    return [queue] + [f"{queue}{_PRIORITY_SEP}{p}" for p in _PRIORITY_STEPS]


class RedisBroker(Broker):
    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.client = redis.Redis.from_url(redis_client_url(url), socket_timeout=TIMEOUT,
                                           socket_connect_timeout=TIMEOUT)

    def problem(self) -> str | None:
        try:
            self.client.ping()
        except (redis.RedisError, OSError) as exc:
            return type(exc).__name__
        return None

    def queue_stats(self, queue: str) -> QueueStats:
        with self.client.pipeline(transaction=False) as pipe:
            for key in queue_keys(queue):
                pipe.llen(key)
            pipe.hlen(_UNACKED)
            *lengths, unacked = pipe.execute()
        return QueueStats(waiting=sum(lengths), unacked=unacked)

    def purge(self, queue: str) -> None:
        self.client.delete(*queue_keys(queue))

    def delete(self, queue: str) -> None:
        self.client.delete(*queue_keys(queue), f"_kombu.binding.{queue}",
                           f"_kombu.binding_permanent.{queue}")


class KombuBroker(Broker):
    """RabbitMQ (or another transport of kombu's), through kombu. AMQP tells how many messages
    of a queue are ready, not how many are delivered and unacknowledged (RabbitMQ's management
    API does): `unacked` is None."""

    def _connect(self) -> Connection:
        conn = Connection(self.url, connect_timeout=TIMEOUT)
        conn.connect()
        return conn

    def problem(self) -> str | None:
        try:
            with self._connect():
                pass
        except Exception as exc:  # noqa: BLE001 - readiness reports any failure
            return type(exc).__name__
        return None

    def queue_stats(self, queue: str) -> QueueStats:
        with self._connect() as conn:
            try:
                ok = conn.channel().queue_declare(queue=queue, passive=True)
            except conn.channel_errors:
                return QueueStats(waiting=0)  # not declared yet: nothing in it
        return QueueStats(waiting=ok.message_count)

    def purge(self, queue: str) -> None:
        with self._connect() as conn, contextlib.suppress(*conn.channel_errors):
            conn.channel().queue_purge(queue)

    def delete(self, queue: str) -> None:
        """The queue and the exchange Celery named like it (its default exchange)."""
        with self._connect() as conn:
            with contextlib.suppress(*conn.channel_errors):
                conn.channel().queue_delete(queue)
            with contextlib.suppress(*conn.channel_errors):
                conn.channel().exchange_delete(queue)


@lru_cache(maxsize=8)
def broker_for(url: str) -> Broker:
    """The broker a Celery broker URL names (one object per URL and process)."""
    return RedisBroker(url) if kind_of(url) == "redis" else KombuBroker(url)
