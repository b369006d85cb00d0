"""Several instances, one truth: three ``gateway serve`` processes and a portal sharing one real PostgreSQL.

Every part is a separate process started the way an operator starts it
(see tests/cluster.py). Instance C runs two workers, so a change must reach
every worker process, not only every host.

The tests run in file order on one cluster; each uses user IDs of its own.
The outage test stops and restarts the database server and runs last.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from tests.cluster import (
    INSTANCES,
    MAX_FAILURES,
    OUTAGE_GRACE,
    PASSWORD,
    Backends,
    Cluster,
    logged_in_everywhere,
    refused_everywhere,
    until,
)
from tests.pgserver import PgServer


@pytest.fixture(scope="module")
def cluster(postgres: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    directory = tmp_path_factory.mktemp("cluster")
    backends = Backends()
    try:
        cluster = Cluster.create(directory, postgres, postgres.new_database(), backends)
        try:
            for i, name in enumerate(INSTANCES):
                cluster.start_gateway(name, workers=2 if i == 2 else 1)
            cluster.start_portal()
            for inst in [*cluster.instances.values(), cluster.portal]:
                assert inst is not None
                inst.wait_ready()
            yield cluster
        finally:
            cluster.close()
    finally:
        backends.close()


@pytest.fixture(autouse=True)
def _close_clients(cluster: Cluster) -> Iterator[None]:
    yield
    while cluster.open_clients:
        cluster.open_clients.pop().close()


# --- 1. one session, every instance -------------------------------------------------------------


def test_a_session_created_at_one_instance_is_accepted_at_the_others(cluster: Cluster) -> None:
    cluster.add_user("LC100001")
    clients = logged_in_everywhere(cluster, "LC100001")
    for name, c in clients.items():
        reply = c.get("/jpxcube/")
        assert reply.status == 200, name
        c.close()


# --- 2. ending or changing a session anywhere ends it everywhere within a second -----------------


def test_logout_at_one_instance_refuses_the_cookie_everywhere_within_a_second(cluster: Cluster) -> None:
    cluster.add_user("LC100002")
    clients = logged_in_everywhere(cluster, "LC100002")
    page = clients["gw-b"].get("/_gateway/logout", Accept="text/html")
    token = re.search(r'name="csrf" value="([^"]+)"', page.body)
    assert token, page.body[:500]
    assert clients["gw-b"].request("POST", "/_gateway/logout", {"csrf": token.group(1)}).status in (200, 303)
    others = {k: v for k, v in clients.items() if k != "gw-b"}
    assert until(lambda: refused_everywhere(others), 1.0) < 1.0


@pytest.mark.parametrize(
    ("user_id", "command"),
    [
        ("LC100003", ("users", "disable", "LC100003")),
        ("LC100004", ("users", "reset-password", "LC100004")),
        ("LC100005", ("users", "set-systems", "LC100005", "--systems", "j-iriss")),
    ],
    ids=["disable", "reset-password", "set-systems"],
)
def test_a_cli_change_refuses_the_cookie_everywhere_within_a_second(
    cluster: Cluster, user_id: str, command: tuple[str, ...]
) -> None:
    cluster.add_user(user_id)
    clients = logged_in_everywhere(cluster, user_id)
    cluster.cli(*command)
    assert until(lambda: refused_everywhere(clients), 1.0) < 1.0
    if command[1] == "set-systems":  # the session lives on, for the system the user still has
        assert all(c.get("/nt/").status == 200 for c in clients.values())


# --- 3. one failure count per account, whichever instance is asked ------------------------------


def _wrong(cluster: Cluster, instance: str, user_id: str) -> int:
    c = cluster.client(instance, user_id)
    try:
        return c.login(user_id, "wrong password 123").status
    finally:
        c.close()


def test_wrong_passwords_spread_over_instances_lock_after_exactly_max_failures(cluster: Cluster) -> None:
    cluster.add_user("LC100006")
    threads = [
        threading.Thread(target=_wrong, args=(cluster, INSTANCES[i % 3], "LC100006")) for i in range(MAX_FAILURES - 1)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    good = cluster.client("gw-c", "LC100006")
    assert good.login("LC100006").status == 303  # four failures in total: not locked yet
    good.close()
    for i in range(MAX_FAILURES):
        _wrong(cluster, INSTANCES[i % 3], "LC100006")
    for name in INSTANCES:
        c = cluster.client(name, "LC100006")
        reply = c.login("LC100006")
        assert reply.status != 303, name  # locked at every instance, the right password too
        c.close()


# --- 4. one audit trail with every instance in it ----------------------------------------------


def test_refusals_of_every_instance_land_in_one_trail_with_an_instance_column(cluster: Cluster) -> None:
    for name in INSTANCES:
        c = cluster.client(name, None)  # no certificate: refused and audited
        assert c.get("/onre/").status == 403
        c.close()

    def seen() -> set[str]:
        out = cluster.cli("audit", "list", "--format", "json", "--since", "1h", "--limit", "1000").stdout
        return {json.loads(line).get("instance", "") for line in out.splitlines() if line.strip()}

    until(lambda: set(INSTANCES) <= seen(), 10.0)
    only_b = cluster.cli("audit", "list", "--format", "json", "--instance", "gw-b", "--since", "1h").stdout
    assert {json.loads(line)["instance"] for line in only_b.splitlines() if line.strip()} == {"gw-b"}


# --- 5. a revocation in the CA reaches every gateway, open connections too ----------------------


def test_a_revocation_is_refused_at_every_instance_within_a_second_on_open_connections(cluster: Cluster) -> None:
    cluster.add_user("LC100007")
    clients = logged_in_everywhere(cluster, "LC100007")
    serial = cluster.clients["LC100007"][2]
    cluster.cli("ca", "revoke", f"{serial:X}", "--reason", "keyCompromise")
    elapsed = until(lambda: refused_everywhere(clients), 1.0)
    assert elapsed < 1.0
    for c in clients.values():
        c.close()


def test_concurrent_issues_for_one_user_yield_exactly_one_valid_certificate(cluster: Cluster) -> None:
    cluster.cli("users", "add", "LC100008", "--systems", "tdnet", "--password-stdin", stdin=PASSWORD + "\n")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway",
                "ca",
                "issue",
                "LC100008",
                "--config",
                str(cluster.base),
                "--out",
                str(cluster.directory / f"race-{i}.p12"),
                "--format",
                "default",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(4)
    ]
    codes = [p.wait(120) for p in procs]
    assert codes.count(0) == 1, codes
    listing = cluster.cli("ca", "list", "--user", "LC100008").stdout
    rows = [line for line in listing.splitlines()[1:] if "LC100008" in line]
    assert len(rows) == 1 and "Valid (有効)" in rows[0], listing  # one certificate, and it is valid


# --- 6. PostgreSQL stops while the gateways run ------------------------------------------------


def test_a_database_outage_refuses_logins_serves_sessions_for_the_grace_then_recovers(cluster: Cluster) -> None:
    if cluster.server.external:
        pytest.fail("this test stops the database server; run it on the tests' own server (unset DATABASE_URL)")
    cluster.add_user("LC100009")
    clients = logged_in_everywhere(cluster, "LC100009")
    support_ids: list[str] = []  # every refusal during the outage: each must reach the trail exactly once
    cluster.server.pg_ctl("stop", mode="immediate")
    try:
        stopped = time.monotonic()
        for c in clients.values():
            assert c.get("/onre/").status == 200  # within the grace: served from memory
        fresh = cluster.client("gw-a", "LC100009")
        login = fresh.login("LC100009")
        assert login.status == 503 and "service_unavailable" in login.body
        fresh.close()
        for name in INSTANCES:  # audited refusals while the database is down: spooled
            c = cluster.client(name, None)
            reply = c.get("/onre/")
            assert reply.status == 403
            support_ids.append(reply.json()["support_id"])
            c.close()
        status, body = cluster.instances["gw-a"].health()
        assert status == 503 and "database" in body, body
        time.sleep(max(0.0, OUTAGE_GRACE + 0.5 - (time.monotonic() - stopped)))
        for c in clients.values():
            reply = c.get("/onre/")
            assert reply.status == 503 and reply.json()["error"] == "service_unavailable"  # past the grace
            support_ids.append(reply.json()["support_id"])
    finally:
        cluster.server.pg_ctl("start")
    until(lambda: all(c.get("/onre/").status == 200 for c in clients.values()), 20.0)
    until(lambda: all(sid in _support_ids(cluster) for sid in support_ids), 20.0)
    time.sleep(1.0)  # a duplicate replay would show up by now
    trail = _support_ids(cluster)
    assert {sid: trail.count(sid) for sid in support_ids} == dict.fromkeys(support_ids, 1)
    for inst in cluster.instances.values():
        assert inst.alive_without_tracebacks(), inst.log.read_text(errors="replace")[-2000:]


def _support_ids(cluster: Cluster) -> list[str]:
    out = cluster.cli("audit", "list", "--format", "json", "--since", "1h", "--limit", "100000").stdout
    return [json.loads(line)["support_id"] for line in out.splitlines() if line.strip()]
