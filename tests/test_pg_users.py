"""PostgreSQL user store: failures from several processes, each with its own pool, lock after exactly max_failures."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time

import pytest

from gateway.storage import postgres
from gateway.storage.pg_users import PgUserStore
from tests.stores import migrate

# One wrong password per process, all released at the same instant; prints what record_failure returned.
_FAIL_ONCE = """
import datetime as dt, json, sys, time
from gateway.access.policy import LoginSettings
from gateway.storage import postgres
from gateway.storage.pg_users import PgUserStore
url, start = sys.argv[1], float(sys.argv[2])
with postgres.Database(postgres.target(url), pool_size=1) as db:
    store = PgUserStore(db)
    store.get_user("warm-up")  # the pool's connection is open before the race starts
    time.sleep(max(0.0, start - time.time()))
    result = store.record_failure("LC000001", "", dt.datetime(2025, 1, 15, 9, tzinfo=dt.UTC), LoginSettings(max_failures=5))
    print(json.dumps({"failures": result.user_failures, "locked": result.locked_until is not None}))
"""


def race(url: str, processes: int) -> list[dict[str, object]]:
    start = time.time() + 3.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _FAIL_ONCE, url, str(start)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(processes)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * processes, [err.decode() for _, err in outputs if err][:1]
    return [json.loads(out) for out, _ in outputs]


@pytest.mark.parametrize("processes", [5, 4])
def test_failures_from_separate_processes_lock_after_exactly_max_failures(pg_url: str, processes: int) -> None:
    migrate(pg_url)
    results = race(pg_url, processes)
    with postgres.Database(postgres.target(pg_url)) as db:
        locked = PgUserStore(db).locked_until("LC000001", dt.datetime(2025, 1, 15, 9, tzinfo=dt.UTC))
    if processes == 5:  # the fifth failure, whichever process made it, starts the lock; no count is lost
        assert sum(bool(r["locked"]) for r in results) == 1
        assert sorted(int(str(r["failures"])) for r in results) == [0, 1, 2, 3, 4]
        assert locked is not None
    else:  # the twin: one failure short, no lock
        assert not any(r["locked"] for r in results)
        assert sorted(int(str(r["failures"])) for r in results) == [1, 2, 3, 4]
        assert locked is None
