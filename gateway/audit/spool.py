"""The audit writer's outage spool: events wait in a local file while PostgreSQL is unreachable.

One file per process (``audit-<instance>-<worker>-<pid>-<random>.jsonl`` in ``audit.spool_dir``),
JSON lines in the one serialised form (:func:`~gateway.audit.events.event_to_dict`),
appended and fsync'd per batch, so a crash loses nothing that was spooled.
Each process holds an exclusive ``flock`` on its own file while it lives;
a file nobody holds belongs to a process that died, and the next process
that looks (at start, and whenever an outage ends) claims and replays it.

Replay sends the events in the order they were spooled and removes a file
only once every event in it is in the database. A replay cut short by a
new outage starts the file over next time: the PostgreSQL store skips
events it already has (``ON CONFLICT DO NOTHING``), so nothing is doubled.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from gateway.audit.events import AuditEvent, event_from_dict, event_to_dict

log = logging.getLogger("gateway.audit")

SUFFIX = ".jsonl"


class _File:
    """A spool file we hold the lock on."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def discard(self) -> None:
        """Empty, unlink and release: a process that opened it meanwhile finds nothing to replay."""
        os.ftruncate(self.fd, 0)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self.fd)


class Spool:
    """One process's spool file plus the orphaned files it has claimed (replayed first, oldest first)."""

    def __init__(self, directory: Path, name: str, max_bytes: int) -> None:
        self.directory = Path(directory)
        self.path = self.directory / f"{name}{SUFFIX}"
        self.max_bytes = max_bytes
        self._own: _File | None = None
        self._orphans: list[_File] = []

    @property
    def pending(self) -> bool:
        """True while some spooled event is not yet in the database."""
        return bool(self._orphans) or (self._own is not None and self._own.size() > 0)

    def claim_orphans(self) -> int:
        """Lock every spool file that no live process holds; returns how many were found."""
        if not self.directory.is_dir():
            return 0
        held = {f.path for f in self._orphans} | {self.path}
        found = []
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            if path in held:
                continue
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError:
                continue  # removed meanwhile, or not ours to read
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)  # a live process's spool
                continue
            found.append(_File(path, fd))
        found.sort(key=lambda f: (os.fstat(f.fd).st_mtime_ns, str(f.path)))
        self._orphans.extend(found)
        return len(found)

    def add(self, events: Sequence[AuditEvent]) -> list[AuditEvent]:
        """Append and fsync ``events``; returns those that did not fit under ``max_bytes``."""
        own = self._open()
        used = own.size()
        lines: list[bytes] = []
        for i, event in enumerate(events):
            line = (json.dumps(event_to_dict(event), ensure_ascii=False) + "\n").encode()
            if used + len(line) > self.max_bytes:
                self._append(own, b"".join(lines))
                return list(events[i:])
            lines.append(line)
            used += len(line)
        self._append(own, b"".join(lines))
        return []

    def replay(self, append: Callable[[Sequence[AuditEvent]], None], batch_size: int) -> int:
        """Send every spooled event, in order, with ``append``; files are removed once sent.

        Whatever ``append`` raises propagates (the caller decides the outage
        goes on); the files stay for the next attempt.
        """
        sent = 0
        for spooled in [*self._orphans, *([self._own] if self._own is not None else [])]:
            events = self._read(spooled)
            for start in range(0, len(events), batch_size):
                append(events[start : start + batch_size])
            sent += len(events)
            spooled.discard()
            if spooled is self._own:
                self._own = None
            else:
                self._orphans.remove(spooled)
        return sent

    def close(self) -> None:
        """Release the locks (files with events stay for the next process); remove an empty own file."""
        if self._own is not None and self._own.size() == 0:
            self._own.discard()
        elif self._own is not None:
            os.close(self._own.fd)
        for f in self._orphans:
            os.close(f.fd)
        self._own, self._orphans = None, []

    def _open(self) -> _File:
        if self._own is None:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Created and locked under a name claim_orphans does not look at, then renamed:
            # between a create and its lock another process could take the file for a dead
            # one's (the lock survives the rename; it is on the open file).
            making = self.path.with_name(self.path.name + ".new")
            fd = os.open(making, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.rename(making, self.path)
            self._own = _File(self.path, fd)
        return self._own

    @staticmethod
    def _append(spooled: _File, data: bytes) -> None:
        if not data:
            return
        view = memoryview(data)
        while view:
            view = view[os.write(spooled.fd, view) :]
        os.fsync(spooled.fd)

    @staticmethod
    def _read(spooled: _File) -> list[AuditEvent]:
        """The events of a file; a torn last line (a crash inside a write) is skipped and said."""
        size = spooled.size()
        data = os.pread(spooled.fd, size, 0) if size else b""
        events = []
        for number, line in enumerate(data.splitlines(), 1):
            try:
                events.append(event_from_dict(json.loads(line)))
            except (ValueError, TypeError) as exc:
                log.error("audit spool %s line %d unreadable, skipped: %s", spooled.path, number, exc)
        return events
