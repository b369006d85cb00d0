"""systemd's readiness protocol (``sd_notify``), spoken directly: one datagram per state.

Why not a library: the protocol is one ``sendto`` of ``KEY=value`` lines to
the AF_UNIX datagram socket named by ``$NOTIFY_SOCKET`` (``@`` meaning the
abstract namespace), and the maintained Python bindings need libsystemd.
Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op, so ``gateway
serve`` behaves the same under a terminal, a container or a unit.

The unit uses ``Type=notify`` and ``NotifyAccess=main``: only the process
systemd started (the supervisor, or the single worker) speaks; the variable
is removed from the environment so spawned workers cannot.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


class Notifier:
    """Sends state changes to systemd; silent when not started by systemd."""

    def __init__(self, address: str | None = None, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = address if address is not None else env.get("NOTIFY_SOCKET") or None
        self.watchdog_seconds = _watchdog_seconds(env)
        self._warned = False

    @classmethod
    def from_environment(cls) -> Notifier:
        """The notifier for this process, taking the variables so child processes do not inherit them."""
        notifier = cls()
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            os.environ.pop(name, None)
        return notifier

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *states: str) -> bool:
        """Send ``KEY=value`` lines in one datagram; False (logged once) if systemd cannot be reached."""
        if self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto("\n".join(states).encode(), target)
        except OSError as exc:
            if not self._warned:
                log.warning("sd_notify: cannot reach systemd", extra={"socket": self.address, "error": str(exc)})
                self._warned = True
            return False
        return True

    def ready(self, status: str = "") -> bool:
        """Every listener is open: systemd may start units ordered after this one."""
        return self.send("READY=1", *_status(status))

    def reloading(self) -> bool:
        """A reload began (``MONOTONIC_USEC`` lets systemd >= 253 match it to ``ExecReload``)."""
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self) -> bool:
        """Draining: no new connections are accepted."""
        return self.send("STOPPING=1")

    def watchdog(self) -> bool:
        """Still alive: the event loop ran this call (fed at half of ``WatchdogSec``)."""
        return self.send("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """A one-line status for ``systemctl status``."""
        return self.send(*_status(text))


def _status(text: str) -> list[str]:
    return [f"STATUS={' '.join(text.split())}"] if text else []


def _watchdog_seconds(env: dict[str, str] | os._Environ[str]) -> float | None:
    """``WatchdogSec`` as systemd passed it, if it is meant for this process."""
    usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None
