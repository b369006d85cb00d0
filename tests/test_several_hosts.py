"""Two gateways as two hosts: each in a network namespace of its own, PostgreSQL reached over a veth link.

What loopback cannot show: the instances talk to the database and to each
other's changes over a network address, as separate hosts do, and one host's
link to the database can be cut *silently* (a blackhole route: no RST, no
FIN, packets just vanish), which a server that was stopped never does. The
listener's heartbeat must notice the cut, the host must keep serving the
sessions it holds for the grace, then refuse with 503 ``service_unavailable``,
and come back when the route does, while the other host never notices.

Namespaces need root (CI runs as root); the test is skipped otherwise.

Layout (k = 1, 2):

    test process ── vh-gwk (10.213.k.1) ══ veth ══ vn-gwk (10.213.k.2) [netns: gateway k]
    PostgreSQL on 127.0.0.1 and 10.213.100.1 (an address on the test host's lo,
    routed to from each namespace through its veth)
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest

from tests.cluster import OUTAGE_GRACE, Backends, Cluster, logged_in_everywhere, refused_everywhere, until
from tests.pgserver import PgServer

DB_ADDRESS = "10.213.100.1"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)")


def ip(*args: str, netns: str | None = None) -> None:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    subprocess.run([*prefix, "ip", *args], check=True, capture_output=True, timeout=30)


@dataclass
class Host:
    """A network namespace with one veth link to the test host."""

    netns: str
    index: int

    @property
    def address(self) -> str:
        return f"10.213.{self.index}.2"

    @property
    def gateway(self) -> str:
        return f"10.213.{self.index}.1"

    def create(self) -> None:
        outside, inside = f"vh-{self.netns}", f"vn-{self.netns}"
        ip("netns", "add", self.netns)
        ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        ip("link", "set", inside, "netns", self.netns)
        ip("addr", "add", f"{self.gateway}/24", "dev", outside)
        ip("link", "set", outside, "up")
        ip("link", "set", "lo", "up", netns=self.netns)
        ip("addr", "add", f"{self.address}/24", "dev", inside, netns=self.netns)
        ip("link", "set", inside, "up", netns=self.netns)
        ip("route", "add", "default", "via", self.gateway, netns=self.netns)

    def cut_database(self) -> None:
        """Drop every packet to PostgreSQL, silently (the clients' link stays up)."""
        ip("route", "add", "blackhole", f"{DB_ADDRESS}/32", netns=self.netns)

    def mend_database(self) -> None:
        ip("route", "del", "blackhole", f"{DB_ADDRESS}/32", netns=self.netns)

    def remove(self) -> None:
        subprocess.run(["ip", "link", "del", f"vh-{self.netns}"], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, check=False)


@dataclass
class Hosts:
    cluster: Cluster
    machines: dict[str, Host]  # by instance name


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    tag = uuid.uuid4().hex[:4]
    machines = [Host(f"gw{tag}{k}", k) for k in (1, 2)]
    ip("addr", "add", f"{DB_ADDRESS}/32", "dev", "lo")
    server = PgServer(
        options=(f"listen_addresses=127.0.0.1,{DB_ADDRESS}",),
        hba="local all all trust\nhost all all 127.0.0.1/32 trust\nhost all all 10.213.0.0/16 trust\n",
    )
    backends: Backends | None = None
    cluster: Cluster | None = None
    try:
        for machine in machines:
            machine.create()
        server.start()
        backends = Backends("0.0.0.0")
        admin_url = server.new_database()  # over the Unix socket: the CLI on the test host uses it
        name = urlsplit(admin_url).path.strip("/")
        directory = tmp_path_factory.mktemp("hosts")
        cluster = Cluster.create(
            directory, server, admin_url, backends, server_names=tuple(m.address for m in machines)
        )
        remote_url = f"postgresql://postgres@{DB_ADDRESS}:{server.port}/{name}"
        for machine in machines:
            cluster.start_gateway(
                machine.netns,
                host=machine.address,
                netns=machine.netns,
                url=remote_url,
                upstream_host=machine.gateway,
            )
        for inst in cluster.instances.values():
            inst.wait_ready()
        yield Hosts(cluster, {m.netns: m for m in machines})
    finally:
        if cluster is not None:
            cluster.close()
        if backends is not None:
            backends.close()
        server.stop()
        for machine in machines:
            machine.remove()
        subprocess.run(["ip", "addr", "del", f"{DB_ADDRESS}/32", "dev", "lo"], capture_output=True, check=False)


def test_a_session_and_its_end_cross_hosts_over_the_network(hosts: Hosts) -> None:
    cluster = hosts.cluster
    first, second = list(cluster.instances)
    cluster.add_user("LC200001")
    clients = logged_in_everywhere(cluster, "LC200001", first_at=first)
    reply = clients[second].get("/onre/")
    assert reply.status == 200
    cluster.cli("users", "disable", "LC200001")  # from the test host, straight to the database
    assert until(lambda: refused_everywhere(clients), 1.0) < 1.0


def test_a_silent_cut_to_the_database_is_noticed_served_for_the_grace_then_refused_and_mended(
    hosts: Hosts,
) -> None:
    cluster = hosts.cluster
    cut_name, other_name = list(cluster.instances)
    machine = hosts.machines[cut_name]
    cluster.add_user("LC200002")
    clients = logged_in_everywhere(cluster, "LC200002", first_at=cut_name)
    machine.cut_database()
    try:
        assert clients[cut_name].get("/onre/").status == 200  # the session it holds
        # The listener's heartbeat (a query after 2 s of silence, 2 s to answer) notices the cut.
        noticed = until(lambda: cluster.instances[cut_name].health()[0] == 503, 15.0)
        noticed_at = time.monotonic()
        assert "database" in cluster.instances[cut_name].health()[1]
        assert clients[cut_name].get("/onre/").status == 200  # within the grace: served from memory
        time.sleep(max(0.0, OUTAGE_GRACE + 0.5 - (time.monotonic() - noticed_at)))
        reply = clients[cut_name].get("/onre/")
        assert reply.status == 503 and reply.json()["error"] == "service_unavailable"
        assert clients[other_name].get("/onre/").status == 200  # the other host never noticed
        assert cluster.instances[other_name].health()[0] == 200
    finally:
        machine.mend_database()
    until(lambda: clients[cut_name].get("/onre/").status == 200, 30.0)
    assert cluster.instances[cut_name].health()[0] == 200
    assert noticed < 12.0  # measured ~7 s: two heartbeats, then the cancelled query gives up
    for inst in cluster.instances.values():
        assert inst.alive_without_tracebacks(), inst.log.read_text(errors="replace")[-2000:]
