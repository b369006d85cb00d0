"""The machine's description for the results: CPU, cores, memory, kernel, versions, date."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import ssl
import subprocess
from pathlib import Path

from bench.load import AUTOCANNON_VERSION


def _first(pattern: str, text: str, default: str = "?") -> str:
    match = re.search(pattern, text, re.MULTILINE)
    return match.group(1).strip() if match else default


def _version(argv: list[str], pattern: str) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "not found"
    return _first(pattern, out.stdout + out.stderr, (out.stdout + out.stderr).strip()[:60])


def describe() -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    meminfo = Path("/proc/meminfo").read_text()
    mem_kib = int(_first(r"^MemTotal:\s+(\d+)", meminfo, "0"))
    import aiohttp

    try:
        import uvloop

        uv = uvloop.__version__
    except ImportError:
        uv = "not installed"
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _first(r"^model name\s*:\s*(.+)$", cpuinfo),
        "cores": str(os.cpu_count()),
        "memory": f"{mem_kib / 2**20:.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl (python)": ssl.OPENSSL_VERSION,
        "openssl (cli)": _version(["openssl", "version"], r"^(OpenSSL [^ ]+)"),
        "nginx": _version(["nginx", "-v"], r"nginx/(\S+)"),
        "aiohttp": aiohttp.__version__,
        "uvloop": uv,
        "node": _version(["node", "--version"], r"^(v\S+)"),
        "autocannon": AUTOCANNON_VERSION,
    }
