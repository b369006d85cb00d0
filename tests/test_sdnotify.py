"""sd_notify over a real AF_UNIX datagram socket, as systemd listens for it."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.certs.files import ThrowawayPki
from gateway.sdnotify import Notifier
from tests.harness import free_port, write_config


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    yield path, sock
    sock.close()


def received(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_states_arrive_as_systemd_reads_them(listener: tuple[str, socket.socket]) -> None:
    path, sock = listener
    notifier = Notifier(environ={"NOTIFY_SOCKET": path})
    assert notifier.ready("serving  on\n:8443")
    assert received(sock) == ["READY=1", "STATUS=serving on :8443"]
    assert notifier.reloading()
    lines = received(sock)
    assert lines[0] == "RELOADING=1" and lines[1].startswith("MONOTONIC_USEC=") and int(lines[1].split("=")[1]) > 0
    assert notifier.stopping() and received(sock) == ["STOPPING=1"]
    assert notifier.watchdog() and received(sock) == ["WATCHDOG=1"]


def test_abstract_socket_address(tmp_path: Path) -> None:
    name = f"gateway-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        assert Notifier(environ={"NOTIFY_SOCKET": "@" + name}).ready()
        assert received(sock) == ["READY=1"]
    finally:
        sock.close()


def test_without_systemd_nothing_is_sent_and_nothing_fails() -> None:
    notifier = Notifier(environ={})
    assert not notifier.enabled
    assert not notifier.ready() and not notifier.stopping() and notifier.watchdog_seconds is None


def test_an_unreachable_socket_is_reported_once_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier(environ={"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert not notifier.ready() and not notifier.ready()
    assert len([r for r in caplog.records if "cannot reach systemd" in r.message]) == 1


def test_watchdog_interval_only_for_this_process() -> None:
    mine = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(environ=mine).watchdog_seconds == 30.0
    assert Notifier(environ={**mine, "WATCHDOG_PID": "1"}).watchdog_seconds is None
    assert Notifier(environ={"WATCHDOG_USEC": "0"}).watchdog_seconds is None
    assert Notifier(environ={"WATCHDOG_USEC": "soon"}).watchdog_seconds is None


def test_from_environment_keeps_children_out(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "n.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = Notifier.from_environment()
    assert notifier.enabled and notifier.watchdog_seconds == 1.0
    assert "NOTIFY_SOCKET" not in os.environ and "WATCHDOG_USEC" not in os.environ


# --- ``gateway serve`` under a NOTIFY_SOCKET, as systemd starts it --------------------------------


class Systemd:
    """The listening end of NOTIFY_SOCKET: each datagram with the sender's pid (SCM_CREDENTIALS)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(path)
        self.seen: list[tuple[int, list[str]]] = []

    def next(self, timeout: float = 60) -> tuple[int, list[str]]:
        self.sock.settimeout(timeout)
        data, ancillary, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
        pid = next(
            struct.unpack("3i", payload[: struct.calcsize("3i")])[0]
            for level, kind, payload in ancillary
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
        )
        entry = (pid, data.decode().split("\n"))
        self.seen.append(entry)
        return entry

    def until(self, state: str, timeout: float = 60) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _pid, lines = self.next(max(0.1, deadline - time.monotonic()))
            if state in lines:
                return lines
        raise AssertionError(f"{state} not sent; seen: {self.seen}")


def tls_connects(the_pki: ThrowawayPki, port: int) -> bool:
    ctx = ssl.create_default_context(cafile=str(the_pki.ca_cert))
    files = the_pki.clients["LC000001"]
    ctx.load_cert_chain(files.cert, files.key)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        return tls.version() is not None


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_speaks_to_systemd_ready_reloading_stopping_and_the_watchdog(
    tmp_path: Path, pki: ThrowawayPki, workers: int
) -> None:
    port, admin = free_port(), free_port()
    extra = {
        "workers": workers,
        "listen": {"host": "127.0.0.1", "port": port},
        "admin": {"host": "127.0.0.1", "port": admin},
        "limits": {"drain_timeout_seconds": 5},
    }
    config = write_config(tmp_path, pki, {"tdnet": 9, "j-iriss": 9, "clearing": 9}, extra=extra)
    systemd = Systemd(str(tmp_path / "notify.sock"))
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1000000"}
    with (tmp_path / "serve.out").open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config)], env=env, stdout=out, stderr=out
        )
    try:
        ready = systemd.until("READY=1")
        assert any(line.startswith("STATUS=") and str(port) in line for line in ready), ready
        assert tls_connects(pki, port)  # READY means listening: a client gets through at once
        systemd.until("WATCHDOG=1", timeout=2)
        systemd.until("WATCHDOG=1", timeout=2)  # fed again, at half of WatchdogSec
        proc.send_signal(signal.SIGHUP)
        reloading = systemd.until("RELOADING=1", timeout=30)
        assert any(line.startswith("MONOTONIC_USEC=") for line in reloading)
        systemd.until("READY=1", timeout=60)
        proc.send_signal(signal.SIGTERM)
        systemd.until("STOPPING=1", timeout=30)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        systemd.sock.close()
    # NotifyAccess=main: only the process systemd started speaks, never a spawned worker.
    assert {pid for pid, _ in systemd.seen} == {proc.pid}, (systemd.seen, (tmp_path / "serve.out").read_text())
