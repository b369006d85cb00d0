"""Structured JSON logs on stdout, one object per line.

Log records carry their fields in ``extra=``; the formatter writes them as
JSON keys. Names that could hold secrets are never passed by our code, and
as a second guard any field whose name looks like a secret is replaced.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from gateway.keys import BACKEND, USER

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_SECRET_WORDS = ("password", "secret", "cookie", "token", "key", "authorization")


class JsonFormatter(logging.Formatter):
    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.worker is not None:
            entry["worker"] = self.worker
        for name, value in vars(record).items():
            if name in _STANDARD or name.startswith("_"):
                continue
            secret = any(word in name.lower() for word in _SECRET_WORDS)
            entry[name] = "[redacted]" if secret else value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def setup_logging(level: str = "info", worker: int | None = None) -> None:
    """Route every logger to stdout as JSON lines."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(worker))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Handshake failures never reach aiohttp (gateway.tls audits them), so its
    # server logger only reports real handler errors: keep them.
    logging.getLogger("aiohttp.server").setLevel(logging.WARNING)
    logging.getLogger("asyncio").setLevel(logging.WARNING)


class JsonAccessLogger(AbstractAccessLogger):
    """aiohttp access log as JSON: no query strings, no cookies, no auth headers."""

    @property
    def enabled(self) -> bool:
        # aiohttp skips the per-request log call entirely when this is False.
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        self.logger.info(
            "access",
            extra={
                "client_ip": request.remote,
                "method": request.method,
                "path": request.path,
                "status": response.status,
                "bytes": response.body_length,
                "duration_ms": round(time * 1000, 2),
                "backend": request.get(BACKEND, ""),
                "user_id": request.get(USER, ""),
            },
        )
