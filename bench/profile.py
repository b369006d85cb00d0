"""Where a gateway worker's CPU goes under load: py-spy samples summarised by layer.

python -m bench.profile keepalive|resumed|all [--seconds 15] [--rate 250] [--no-native]

Starts the bench backend and a one-worker ``gateway serve`` (the bench's configuration, logged in), drives
it with the bench's own load (``keepalive``: autocannon, 50 connections, logged-in GET; ``resumed``:
``openssl s_time -reuse``, a resumed handshake + one logged-in GET per connection) and records the worker
with ``py-spy record --native`` (Python and C frames: OpenSSL, uvloop, the kernel's entry points). The
collapsed stacks go to ``bench/out/profile-<load>.txt`` (feed them to any flame-graph tool) and a summary,
the share of samples per layer and the hottest functions, to ``bench/profiles/<load>.md``.

A sample counts for the innermost frame that names a layer (see :data:`LAYERS`): the work a library does
on a layer's behalf (hashing for the session check, say) counts for that layer, and C code called from
the event loop (OpenSSL reading a record, ``send()``) for TLS or the kernel. py-spy is installed into the
virtualenv at a pinned version on first use.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench import load
from bench.fixtures import OUT, ensure_crl, load_pki
from bench.run import log
from bench.servers import PY, Backend, Gateway

PY_SPY_VERSION = "0.4.1"
SUMMARIES = Path(__file__).resolve().parent / "profiles"

# (layer, pattern on one frame "function (file:line)" as py-spy prints it), tried innermost frame first.
# Syscall wrappers first: the kernel's time is spent below them. Frames that name no layer (hashlib,
# the cryptography package, libcrypto, builtins) pass the sample on to their caller.
LAYERS: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "kernel (syscalls)",
        re.compile(
            r"^(__libc_|__GI___|__send|__recv|__write|__read|epoll_|writev|readv|"
            r"send|recv|sendmsg|recvmsg|accept4?|close|__close)\b[^(]*\(",
            re.I,
        ),
    ),
    (
        "TLS (OpenSSL, ssl, sslproto)",
        re.compile(
            r"(^(SSL_|ssl3_|ssl_|tls_|tls13_|ossl_statem|dtls|"
            r"state_machine|read_state|write_state)|\bssl\.py|sslproto|libssl)"
        ),
    ),
    ("session lookup", re.compile(r"gateway/(\w+/)*session")),
    ("upstream client", re.compile(r"(gateway/(\w+/)*(upstream|proxy)|aiohttp/client)")),
    ("certificate and revocation checks", re.compile(r"gateway/(\w+/)*(cert|revocation|crl|tls|pki)")),
    ("audit", re.compile(r"gateway/(\w+/)*audit")),
    ("gateway middleware and handlers", re.compile(r"gateway/")),
    (
        "aiohttp HTTP parser and writer",
        re.compile(
            r"(aiohttp/(_?http_parser|_?http_writer|http_)|httptools|"
            r"llhttp|_http_parser)"
        ),
    ),
    ("aiohttp server (protocol, request, response)", re.compile(r"aiohttp/(web|helpers|streams|base_protocol)")),
    ("event loop (uvloop, asyncio)", re.compile(r"(uvloop|asyncio/|uv__|uv_run)")),
)
OTHER = "other (interpreter, allocator, unnamed C)"


@dataclass(frozen=True)
class Summary:
    samples: int
    layers: list[tuple[str, int]]
    leaves: list[tuple[str, int]]


def ensure_py_spy() -> Path:
    """py-spy from PyPI, pinned, into the virtualenv that runs the bench."""
    binary = Path(sys.executable).parent / "py-spy"
    if binary.exists():
        return binary
    log(f"installing py-spy {PY_SPY_VERSION} (pip)")
    subprocess.run([PY, "-m", "pip", "install", "-q", f"py-spy=={PY_SPY_VERSION}"], check=True)
    return binary


def classify(frames: list[str]) -> str:
    """The layer of the innermost frame that names one (frames are outermost first)."""
    for frame in reversed(frames):
        for layer, pattern in LAYERS:
            if pattern.search(frame):
                return layer
    return OTHER


def parse_collapsed(text: str) -> list[tuple[list[str], int]]:
    """py-spy's ``--format raw`` lines: ``frame;frame;...;frame COUNT``, outermost frame first."""
    stacks = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def summarise(text: str, top: int = 15) -> Summary:
    layers: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for frames, count in parse_collapsed(text):
        layers[classify(frames)] += count
        leaves[re.sub(r":\d+\)$", ")", frames[-1])] += count
    return Summary(sum(layers.values()), layers.most_common(), leaves.most_common(top))


def render(kind: str, summary: Summary, note: str) -> str:
    n = max(1, summary.samples)
    out = [f"# Gateway profile: {kind}", "", note, "", f"{summary.samples:,} samples.", ""]
    out += ["| layer | share of samples |", "|---|---|"]
    out += [f"| {layer} | {100 * count / n:.1f} % |" for layer, count in summary.layers]
    out += ["", "Hottest innermost frames (self time):", "", "| frame | share |", "|---|---|"]
    out += [f"| `{frame}` | {100 * count / n:.1f} % |" for frame, count in summary.leaves]
    return "\n".join(out) + "\n"


def drive(kind: str, gateway: Gateway, seconds: float, stop: threading.Event) -> None:
    """Keep the load on until ``stop`` is set (loads of a few seconds each, back to back)."""
    pki = gateway.pki
    while not stop.is_set():
        if kind == "keepalive":
            url = f"https://127.0.0.1:{gateway.port}/onre/tiny"
            load.autocannon(url, 50, min(5.0, seconds), {"Cookie": gateway.cookie}, pki)
        else:
            load.s_time(gateway.port, pki, gateway.cookie, min(5.0, seconds), reuse=True)


def profile(kind: str, seconds: float, rate: int, native: bool) -> Path:
    spy = ensure_py_spy()
    pki = load_pki(log)
    workdir = Path(tempfile.mkdtemp(prefix="profile-", dir=OUT))
    backend = Backend(workdir).start()
    gateway = Gateway(workdir, pki, backend.port, 1, ensure_crl(pki, 0, log=log)).start()
    raw = OUT / f"profile-{kind}.txt"
    stop = threading.Event()
    loader = threading.Thread(target=drive, args=(kind, gateway, seconds, stop))
    try:
        loader.start()
        time.sleep(2)  # warm-up: connections open, sessions cached
        assert gateway.proc is not None
        argv = [str(spy), "record", "--pid", str(gateway.proc.pid), "--duration", str(int(seconds))]
        argv += ["--rate", str(rate), "--format", "raw", "--output", str(raw)] + (["--native"] if native else [])
        log(f"py-spy on the gateway worker under {kind} load for {seconds:.0f} s")
        subprocess.run(argv, check=True, capture_output=True)
    finally:
        stop.set()
        loader.join()
        gateway.stop()
        backend.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    load_desc = {
        "keepalive": "autocannon, 50 connections, logged-in keep-alive GET `/onre/tiny`",
        "resumed": "`openssl s_time -reuse`, one resumed handshake + one logged-in GET per connection",
    }[kind]
    note = (
        f"`python -m bench.profile {kind}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: one-worker "
        f"`gateway serve` under {load_desc}; py-spy {PY_SPY_VERSION} `record {'--native ' if native else ''}"
        f"--rate {rate}` for {seconds:.0f} s (samples of the worker while it runs; idle waits are not sampled). "
        "Each sample counts for the innermost frame naming a layer (bench/profile.py `LAYERS`)."
    )
    SUMMARIES.mkdir(exist_ok=True)
    summary_path = SUMMARIES / f"{kind}.md"
    summary_path.write_text(render(kind, summarise(raw.read_text()), note))
    return summary_path


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    p.add_argument("load", choices=("keepalive", "resumed", "all"))
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--rate", type=int, default=250, help="samples per second")
    p.add_argument("--no-native", action="store_true", help="Python frames only (C time goes to its caller)")
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for kind in ("keepalive", "resumed") if args.load == "all" else (args.load,):
        path = profile(kind, args.seconds, args.rate, not args.no_native)
        print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
