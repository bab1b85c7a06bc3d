"""The Celery side of ``short-runs``: a no-op task, late acknowledgement, Redis broker
and result backend. ``python -m raftmesh.bench.celery_app REDIS_URL QUEUE`` runs
the worker (prefork, 3 processes: one per core the peers would get, as raftmesh
gets 3 peers); the benchmark imports ``make_app`` to send the tasks."""

from __future__ import annotations

import sys

from celery import Celery


def make_app(redis_url: str, queue: str) -> Celery:
    app = Celery("raftmesh_bench", broker=redis_url, backend=redis_url)
    app.conf.update(
        task_acks_late=True,
        task_default_queue=queue,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )

    @app.task(name="noop")
    def noop() -> None:
        return None

    return app


if __name__ == "__main__":
    url, queue = sys.argv[1], sys.argv[2]
    make_app(url, queue).worker_main(
        ["worker", "-P", "prefork", "-c", "3", "-Q", queue, "-l", "warning"]
        + ["--without-heartbeat", "--without-gossip", "--without-mingle"]
    )
