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

# A stack with one of these frames is a thread waiting (an idle executor thread, the loop in epoll): not CPU.
WAITING = re.compile(r"^(epoll_p?wait|PyThread_acquire_lock_timed|_queue_SimpleQueue_get\w*|pthread_cond_\w*wait) ")
GC = re.compile(r"^gc_collect_main ")
# (layer, pattern on one frame "function (file:line)" as py-spy prints it), tried innermost frame first.
# Frames that name no layer (libcrypto, libpython, hashlib, unnamed addresses) pass the sample to their caller.
LAYERS: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "kernel (system calls)",
        re.compile(
            r"^(write|read|writev|readv|send|recv|sendto|recvfrom|sendmsg|recvmsg|fcntl(64)?|epoll_ctl|accept4?|"
            r"close|shutdown|[gs]etsockopt|ioctl|__libc_\w+|__GI___\w+) \((libc|libpthread)"
        ),
    ),
    ("TLS (OpenSSL, ssl, uvloop's SSLProtocol)", re.compile(r"(SSLProtocol|^SSL_|\(libssl|\(_ssl\.c|\(ssl\.py)")),
    ("session lookup", re.compile(r"\(gateway/(\w+/)*\w*session")),
    ("upstream client (gateway.forward.upstream)", re.compile(r"\((gateway/(\w+/)*upstream|aiohttp/client)")),
    ("proxying: headers and relay (gateway.forward.proxy)", re.compile(r"\(gateway/(\w+/)*proxy")),
    ("certificate and revocation checks", re.compile(r"\(gateway/(\w+/)*\w*(cert|revocation|crl|tls|pki)")),
    ("audit", re.compile(r"\(gateway/(\w+/)*\w*audit")),
    ("gateway middleware and handlers", re.compile(r"\(gateway/")),
    ("aiohttp HTTP parser and writer", re.compile(r"(\(aiohttp/_?http_|httptools|llhttp)")),
    ("aiohttp server (protocol, routing, request, response)", re.compile(r"\(aiohttp/")),
    ("event loop (uvloop, asyncio)", re.compile(r"(\(loop\.c|\(asyncio/|\(_asynciomodule|^uv_|^uv__|\(libuv)")),
)
OTHER = "other (interpreter, allocator, unnamed C)"
GARBAGE = "garbage collector"


@dataclass(frozen=True)
class Summary:
    samples: int  # samples of a running thread (the shares are of these)
    waiting: int  # samples of threads waiting (executor threads, the loop in epoll)
    layers: list[tuple[str, int]]
    leaves: list[tuple[str, int]]
    inclusive: list[tuple[str, int]]


def ensure_py_spy() -> Path:
    """py-spy from PyPI, pinned, into the virtualenv that runs the bench."""
    binary = Path(sys.executable).parent / "py-spy"
    if binary.exists():
        return binary
    log(f"installing py-spy {PY_SPY_VERSION} (pip)")
    subprocess.run([PY, "-m", "pip", "install", "-q", f"py-spy=={PY_SPY_VERSION}"], check=True)
    return binary


def classify(frames: list[str]) -> str | None:
    """The layer of one stack (frames outermost first); None for a waiting thread.

    The garbage collector counts as itself wherever it was triggered (the objects it traverses name other
    layers); otherwise the innermost frame that names a layer decides.
    """
    if any(WAITING.search(frame) for frame in frames):
        return None
    if any(GC.search(frame) for frame in frames):
        return GARBAGE
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
    inclusive: Counter[str] = Counter()
    waiting = 0
    for frames, count in parse_collapsed(text):
        layer = classify(frames)
        if layer is None:
            waiting += count
            continue
        names = [re.sub(r":\d+\)$", ")", frame) for frame in frames]
        layers[layer] += count
        leaves[names[-1]] += count
        for name in set(names):
            inclusive[name] += count
    samples = sum(layers.values())
    # Frames on (nearly) every stack, unnamed ones and the event loop's plumbing say nothing: left out.
    loop = dict(LAYERS)["event loop (uvloop, asyncio)"]
    spread = [
        (name, n)
        for name, n in inclusive.most_common()
        if n < 0.9 * samples and not name.startswith("0x") and not loop.search(name)
    ]
    return Summary(samples, waiting, layers.most_common(), leaves.most_common(top), spread[: 2 * top])


def render(kind: str, summary: Summary, note: str) -> str:
    n = max(1, summary.samples)
    out = [f"# Gateway profile: {kind}", "", note, ""]
    out.append(f"{summary.samples:,} samples of running code ({summary.waiting:,} of waiting threads left out).")
    out += ["", "| layer | share of samples |", "|---|---|"]
    out += [f"| {layer} | {100 * count / n:.1f} % |" for layer, count in summary.layers]
    out += ["", "Hottest innermost frames (self time):", "", "| frame | share |", "|---|---|"]
    out += [f"| `{frame}` | {100 * count / n:.1f} % |" for frame, count in summary.leaves]
    out += ["", "Frames by inclusive share (the frame and everything it called):", "", "| frame | share |", "|---|---|"]
    out += [f"| `{frame}` | {100 * count / n:.1f} % |" for frame, count in summary.inclusive]
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
        f"--rate {rate}` for {seconds:.0f} s. Samples of waiting threads (executor threads on their queue, the loop in "
        "`epoll_wait`) are left out; each other sample counts for the innermost frame naming a layer "
        "(bench/profile.py `LAYERS`), frames of libcrypto, libpython or unnamed C pass it to their caller. "
        "The figures vary run to run on a shared box; read the shares, not the sample counts."
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
