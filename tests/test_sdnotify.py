"""sd_notify over a real AF_UNIX datagram socket, as systemd listens for it."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.sdnotify import Notifier


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
