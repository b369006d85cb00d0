"""The supervisor of ``gateway serve`` (a real process): a crashed worker comes back with the validated config, with backoff."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.certs.files import ThrowawayPki
from gateway.server import Backoff
from tests.harness import free_port, without_instance, write_config


def test_backoff_doubles_to_the_ceiling_and_resets_after_a_stable_run() -> None:
    backoff = Backoff(first=1.0, ceiling=60.0, stable=60.0)
    quick = [backoff.next_delay(uptime=2.0) for _ in range(8)]
    assert quick == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    assert backoff.next_delay(uptime=60.0) == 1.0  # it had run long enough: start over
    assert backoff.next_delay(uptime=0.5) == 2.0


class Served:
    """``gateway serve`` with two workers, its JSON log lines read from a file."""

    def __init__(self, directory: Path, the_pki: ThrowawayPki) -> None:
        self.port, self.admin = free_port(), free_port()
        extra = {
            "workers": 2,
            "listen": {"host": "127.0.0.1", "port": self.port},
            "admin": {"host": "127.0.0.1", "port": self.admin},
            "limits": {"drain_timeout_seconds": 5},
            "log_level": "info",
        }
        self.config = write_config(directory, the_pki, {"tdnet": 9, "j-iriss": 9, "clearing": 9}, extra=extra)
        self.log = directory / "serve.out"
        self.ca = the_pki.ca_cert
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"message": line})
        return out

    def wait_for(self, found: Callable[[list[dict[str, Any]]], Any], seconds: float = 60) -> Any:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            result = found(self.lines())
            if result:
                return result
            assert self.proc.poll() is None, self.log.read_text()
            time.sleep(0.1)
        raise AssertionError(f"not seen within {seconds} s:\n{self.log.read_text()}")

    def restarted(self, worker: int) -> list[dict[str, Any]]:
        return [e for e in self.lines() if e.get("message") == "worker restarted" and e.get("worker") == worker]

    def exits(self, worker: int) -> list[dict[str, Any]]:
        return [
            e for e in self.lines() if e.get("message") == "worker exited; restarting" and e.get("worker") == worker
        ]

    def answers(self) -> int:
        """The status of a request without a certificate: the gateway's 403 page, so a worker serves."""
        ctx = ssl.create_default_context(cafile=str(self.ca))
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{self.port}/onre/", context=ctx, timeout=5) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/metrics", timeout=5) as r:
            return without_instance(r.read().decode())


@pytest.fixture
def served(tmp_path: Path, pki: ThrowawayPki) -> Iterator[Served]:
    gw = Served(tmp_path, pki)
    yield gw
    if gw.proc.poll() is None:
        gw.proc.send_signal(signal.SIGTERM)
        try:
            gw.proc.wait(60)
        except subprocess.TimeoutExpired:
            gw.proc.kill()
            gw.proc.wait()


def test_a_crashed_worker_restarts_with_the_validated_config_and_backs_off(served: Served) -> None:
    started = served.wait_for(lambda ls: [e for e in ls if e.get("message") == "supervisor started"])
    pids = started[0]["pids"]
    assert len(pids) == 2 and served.answers() == 403
    # The file on disk goes bad after the supervisor validated it: a re-read would fail to start.
    served.config.write_text("backends: [unclosed\n", encoding="utf-8")
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    served.wait_for(lambda ls: served.restarted(0) and served.restarted(1))
    deadline = time.monotonic() + 60
    while True:  # both workers are new processes: whoever answers runs the validated config
        try:
            if served.answers() == 403:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, served.log.read_text()
        time.sleep(0.2)
    assert not any("could not start" in str(e.get("message")) for e in served.lines())

    # Worker 0 keeps crashing soon after each start: 1 s, then 2 s, then 4 s before the next start.
    for crashes in (2, 3):
        pid = served.wait_for(lambda ls, n=crashes: len(served.restarted(0)) >= n - 1 and served.restarted(0)[-1])[
            "pid"
        ]
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
        served.wait_for(lambda ls, n=crashes: len(served.exits(0)) >= n)
    assert [e["delay_seconds"] for e in served.exits(0)] == [1.0, 2.0, 4.0]
    third = time.monotonic()
    served.wait_for(lambda ls: len(served.restarted(0)) >= 3, seconds=30)
    assert time.monotonic() - third >= 3.0  # the 4 s wait was kept (less the polling slack)
    assert 'gateway_worker_restarts_total{worker="0"} 3.0' in served.metrics()
    assert 'gateway_worker_restarts_total{worker="1"} 1.0' in served.metrics()
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(60) == 0
