"""The broker setting and what fhirq asks of RabbitMQ besides Celery: FHIRQ_BROKER_URL wins over
FHIRQ_REDIS_URL; on RabbitMQ the job queue is a quorum queue with publisher confirms; /readyz and
/metrics read it. Against the RabbitMQ of FHIRQ_TEST_BROKER_URL, else amqp://guest@127.0.0.1
(these tests are skipped, saying so, when none answers)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from kombu import Connection, Exchange, Producer, Queue
from sqlalchemy import Engine

from core.config import Settings, get_settings
from tests.conftest import BROKER_URL
from worker.broker import KombuBroker, broker_for, kind_of
from worker.celery_app import broker_conf

RABBITMQ_URL = (BROKER_URL if kind_of(BROKER_URL) == "rabbitmq"
                else "amqp://guest:guest@127.0.0.1:5672//")
QUEUE = f"fhirq-broker-test-{os.getpid()}"


def _settings(**env: str) -> Settings:
    saved = {k: os.environ.pop(k, None) for k in ("FHIRQ_BROKER_URL", "FHIRQ_REDIS_URL")}
    try:
        os.environ.update(env)
        return Settings()
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


def test_broker_url_wins_over_redis_url_and_redis_stays_the_default() -> None:
    amqp = "amqp://u:p@mq:5672//"
    assert _settings(FHIRQ_BROKER_URL=amqp, FHIRQ_REDIS_URL="redis://r:6379/0").broker == amqp
    assert _settings(FHIRQ_REDIS_URL="redis://r:6379/1").broker == "redis://r:6379/1"
    assert _settings().broker == "redis://127.0.0.1:6379/0"


def test_rabbitmq_gets_a_quorum_queue_with_publisher_confirms() -> None:
    cfg = replace(get_settings(), broker_url="amqp://mq//", queue="jobs", visibility_timeout=7200,
                  transaction_time_limit=3600)
    conf = broker_conf(cfg)
    (queue,) = conf["task_queues"]
    assert queue.name == "jobs" and queue.durable
    assert queue.queue_arguments == {"x-queue-type": "quorum"}
    # Longer than a transaction may run, which RabbitMQ's default (30 min) is not.
    assert queue.consumer_arguments == {"x-consumer-timeout": 7_200_000}
    assert conf["task_time_limit"] * 1000 < 7_200_000
    # Native delayed delivery (countdown retries on quorum queues) needs a topic exchange.
    assert queue.exchange.type == "topic"
    assert conf["broker_transport_options"] == {"confirm_publish": True}
    assert conf["task_create_missing_queue_type"] == "quorum"

    redis = broker_conf(replace(cfg, broker_url=None, redis_url="redis://r/0"))
    assert redis["broker_transport_options"] == {"visibility_timeout": 7200}
    assert redis["task_queues"] is None


@pytest.fixture(scope="module")
def rabbitmq() -> Iterator[KombuBroker]:
    broker = broker_for(RABBITMQ_URL)
    if (problem := broker.problem()) is not None:
        pytest.skip(f"no RabbitMQ answers at {RABBITMQ_URL}: {problem}")
    assert isinstance(broker, KombuBroker)
    yield broker
    broker.delete(QUEUE)


def _job_queue(conn: Connection) -> Queue:
    """The job queue exactly as the workers declare it."""
    conf = broker_conf(replace(get_settings(), broker_url=RABBITMQ_URL, queue=QUEUE))
    (queue,) = conf["task_queues"]
    return queue(conn.default_channel)


def test_queue_depth_purge_and_delete_on_rabbitmq(rabbitmq: KombuBroker) -> None:
    assert rabbitmq.queue_stats(QUEUE).waiting == 0  # not declared yet
    conf = broker_conf(replace(get_settings(), broker_url=RABBITMQ_URL, queue=QUEUE))
    with Connection(RABBITMQ_URL, transport_options=conf["broker_transport_options"]) as conn:
        queue = _job_queue(conn)
        queue.declare()
        producer = Producer(conn.default_channel, exchange=queue.exchange,
                            routing_key=queue.routing_key)
        for i in range(3):
            producer.publish({"n": i}, delivery_mode=2)
    with Connection(RABBITMQ_URL) as conn, pytest.raises(conn.channel_errors) as refused:
        # RabbitMQ holds it as a quorum queue: a classic one of that name is refused.
        Queue(QUEUE, Exchange(QUEUE, type="topic"), routing_key=QUEUE)(conn.channel()).declare()
    assert "x-queue-type" in str(refused.value)
    stats = rabbitmq.queue_stats(QUEUE)
    assert stats.waiting == 3
    assert stats.unacked is None  # AMQP does not say; the metric is left out

    rabbitmq.purge(QUEUE)
    assert rabbitmq.queue_stats(QUEUE).waiting == 0
    rabbitmq.delete(QUEUE)
    with Connection(RABBITMQ_URL) as conn, pytest.raises(conn.channel_errors):
        conn.default_channel.queue_declare(queue=QUEUE, passive=True)


def test_publisher_confirms_report_a_message_the_broker_refused(rabbitmq: KombuBroker) -> None:
    """With the transport options fhirq sets, a publish returns only once RabbitMQ took the
    message, and raises when it refused it (here: a full queue that rejects publishes)."""
    from amqp.exceptions import MessageNacked

    full = f"{QUEUE}-full"
    options = broker_conf(replace(get_settings(), broker_url=RABBITMQ_URL))
    try:
        with Connection(RABBITMQ_URL,
                        transport_options=options["broker_transport_options"]) as conn:
            exchange = Exchange(full, type="topic")
            queue = Queue(full, exchange, routing_key=full, queue_arguments={
                "x-max-length": 0, "x-overflow": "reject-publish"})(conn.default_channel)
            queue.declare()
            producer = Producer(conn.default_channel, exchange=exchange, routing_key=full)
            with pytest.raises(MessageNacked):
                producer.publish({"n": 1})
    finally:
        rabbitmq.delete(full)


def test_readyz_and_metrics_ask_rabbitmq(rabbitmq: KombuBroker, engine: Engine) -> None:
    from api import create_app

    def app_for(url: str) -> Any:
        app = create_app(replace(get_settings(), auth="off", broker_url=url, queue=QUEUE))
        app.config["TESTING"] = True
        return app.test_client()

    up = app_for(RABBITMQ_URL)
    assert up.get("/readyz").get_json() == {"status": "ok"}
    metrics = up.get("/metrics").get_data(as_text=True)
    assert 'fhirq_metrics_source_up{source="rabbitmq"} 1.0' in metrics
    assert f'fhirq_queue_depth{{queue="{QUEUE}"}} 0.0' in metrics
    assert "fhirq_queue_unacked" not in metrics

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = app_for(f"amqp://guest:guest@127.0.0.1:{port}//")
    r = down.get("/readyz")
    assert r.status_code == 503
    assert r.get_json()["down"] == ["broker"]
    assert 'fhirq_metrics_source_up{source="rabbitmq"} 0.0' in down.get("/metrics").get_data(
        as_text=True)
