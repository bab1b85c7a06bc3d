"""The DBOS side of ``short-runs`` and ``steps``: one DBOS process that starts the
workflows itself (DBOS has no separate worker: submission is execution).

    python -m raftmesh.bench.dbos_app URL SCHEMA RUNS STEPS IN_FLIGHT

``IN_FLIGHT`` threads each start a workflow and wait for it, until ``RUNS``
have run; each workflow runs ``STEPS`` no-op steps, every one a checkpoint.
Prints one JSON line: the wall-clock time of the first start. The benchmark
reads the finishes from the system tables afterwards.
"""

from __future__ import annotations

import json
import sys
import threading
import time

from dbos import DBOS


@DBOS.step()
def noop_step(i: int) -> int:
    return i


@DBOS.workflow()
def noop_workflow(steps: int) -> None:
    for i in range(steps):
        noop_step(i)


def main(url: str, schema: str, runs: int, steps: int, in_flight: int) -> None:
    DBOS(
        config={
            "name": "raftmesh-bench",
            "system_database_url": url,
            "dbos_system_schema": schema,
            "log_level": "WARNING",
        }
    )
    DBOS.launch()
    counter = iter(range(runs))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if next(counter, None) is None:
                    return
            DBOS.start_workflow(noop_workflow, steps).get_result()

    first_at = time.time()
    threads = [threading.Thread(target=worker) for _ in range(in_flight)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps({"first_at": first_at}), flush=True)
    DBOS.destroy()


if __name__ == "__main__":
    url, schema = sys.argv[1], sys.argv[2]
    main(url, schema, int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
