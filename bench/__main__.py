"""``python -m bench``: the gateway against nginx, every figure of the benchmark, one markdown table.

./dev.sh bench                 # full run (~15 min on 2 cores), writes bench/RESULTS.md
./dev.sh bench --quick         # smoke run, a few seconds per figure (~3 min)
./dev.sh bench --workers 1     # only one worker count
./dev.sh bench shared-state    # shared state in PostgreSQL vs SQLite (bench/shared_state.py, ~4 min)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from bench import load, machine, report, servers
from bench.fixtures import OUT, load_pki
from bench.run import Plan, Runner, log

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x.replace("_", "")) for x in text.split(",") if x.strip())


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 3 s per figure, CRLs up to 100,000, 256 MiB streams"
    )
    p.add_argument("--workers", type=_ints, default=(1, 2), help="worker counts to compare, e.g. 1,2 (default)")
    p.add_argument("--crl-sizes", type=_ints, default=None, help="CRL sizes for figure 3 (default 1000,100000,1000000)")
    p.add_argument("--seconds", type=float, default=None, help="duration of each load figure (default 10, quick 3)")
    p.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="uvloop",
        help="the gateway's event loop: uvloop (default: what `gateway serve` picks by itself when uvloop is "
        "installed) or asyncio (uvloop hidden, for comparison)",
    )
    p.add_argument(
        "--loadgen-threads",
        type=int,
        default=load.AUTOCANNON_THREADS,
        help="autocannon threads for keep-alive load and its ceiling (default 1; see bench/README.md)",
    )
    p.add_argument("--no-save", action="store_true", help="print the table but leave bench/RESULTS.md alone")
    p.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs) for inspection")
    return p.parse_args(argv)


def plan_from(args: argparse.Namespace) -> Plan:
    quick = args.quick
    seconds = args.seconds or (3.0 if quick else 10.0)
    sizes = args.crl_sizes or ((1000, 100_000) if quick else (1000, 100_000, 1_000_000))
    return Plan(
        workers=args.workers,
        crl_sizes=sizes,
        handshake_seconds=seconds,
        keepalive_seconds=seconds if quick else seconds * 1.5,
        connections=(50, 200),
        stream_bytes=(256 if quick else 1024) * 2**20,
        reload_entries=100_000 if quick else 1_000_000,
        reload_seconds=max(6.0, seconds * 2),
        loop=args.loop,
        quick=quick,
        loadgen_threads=args.loadgen_threads,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["shared-state"]:
        from bench import shared_state

        return shared_state.main(argv[1:], prog="./dev.sh bench shared-state")
    args = parse_args(argv)
    for tool in ("nginx", "openssl", "curl", "node", "npm"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} not found; run ./dev.sh bench (installs nginx nodejs npm) as root", file=sys.stderr)
            return 2
    plan = plan_from(args)
    OUT.mkdir(parents=True, exist_ok=True)
    shim = servers.loop_shim(plan.loop, OUT)
    if shim is not None:
        servers.SHIM.append(shim)
    workdir = Path(tempfile.mkdtemp(prefix="run-", dir=OUT))
    log(f"work directory {workdir}")
    pki = load_pki(log)
    try:
        results = Runner(plan, pki, workdir).run()
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    results.pop("cookie", None)
    desc = machine.describe()
    command = "./dev.sh bench " + shlex.join(argv)
    text = report.render(results, desc, command.strip())
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    (OUT / f"results-{stamp}.json").write_text(json.dumps({"machine": desc, **results}, indent=2))
    (OUT / f"results-{stamp}.md").write_text(text)
    print()
    print(text)
    if not args.no_save:
        report.write_results(RESULTS, text)
        log(f"saved to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
