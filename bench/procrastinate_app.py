"""The procrastinate side of ``short-runs``: a no-op task in a schema of its own.
``python -m raftmesh.bench.procrastinate_app CONNINFO SCHEMA`` runs a worker with
concurrency 3; the benchmark imports ``make_app`` to apply the schema and defer."""

from __future__ import annotations

import asyncio
import sys

import procrastinate


def make_app(conninfo: str, schema: str) -> procrastinate.App:
    connector = procrastinate.PsycopgConnector(
        conninfo=conninfo, kwargs={"options": f"-c search_path={schema}"}
    )
    app = procrastinate.App(connector=connector)

    @app.task(name="noop")
    async def noop() -> None:
        return None

    return app


async def _work(conninfo: str, schema: str) -> None:
    app = make_app(conninfo, schema)
    async with app.open_async():
        await app.run_worker_async(concurrency=3)


if __name__ == "__main__":
    asyncio.run(_work(sys.argv[1], sys.argv[2]))
