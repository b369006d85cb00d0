"""The bench's reading of its tools' output, its ceiling rule and its profile summary (captured output, no network).

Under tests/samples/: autocannon 8.0.0 ``--json`` reports captured from real runs (nginx ``return 200``
with the client certificate, the gateway answering 303 to an expired session, nginx answering 400 to a
client without a certificate, a refused port), and lines of py-spy 0.4.1 ``record --native --format raw``
captured from a gateway worker under keep-alive load.
"""

from __future__ import annotations

from pathlib import Path

from bench import load, profile, report

SAMPLES = Path(__file__).parent / "samples"


def sample(name: str) -> str:
    return (SAMPLES / f"autocannon-{name}.json").read_text()


def test_autocannon_report_of_200s_counts_them_good() -> None:
    res = load.parse_autocannon(sample("nginx-200"), wall=1.5, cpu=1.2)
    assert (res.ok, res.bad, res.errors) == (20859, 0, "")
    assert res.requests_per_second == 20856
    assert (res.p50_ms, res.p99_ms, res.max_ms) == (0, 0, 26)
    assert (res.seconds, res.client_cpu) == (1.5, 1.2)


def test_autocannon_redirects_are_bad_answers() -> None:
    """A 303 to /login (an expired session) is not a logged-in request: it must not count as served."""
    res = load.parse_autocannon(sample("gateway-303"), wall=1.0, cpu=1.0)
    assert (res.ok, res.bad) == (0, 6300)


def test_autocannon_refusal_without_certificate_is_a_bad_answer() -> None:
    res = load.parse_autocannon(sample("nginx-400"), wall=1.0, cpu=1.0)
    assert (res.ok, res.bad) == (0, 348)
    assert res.p99_ms == 598


def test_autocannon_connection_errors_are_reported() -> None:
    res = load.parse_autocannon(sample("refused"), wall=1.0, cpu=0.5)
    assert (res.ok, res.bad, res.requests_per_second) == (0, 0, 0)
    assert res.errors == "errors 1936"


def test_autocannon_output_after_a_warning_line_and_no_output_at_all() -> None:
    """npm or node may print a line before the report; a tool that died prints nothing: zeros, not a crash."""
    res = load.parse_autocannon("(node:1) Warning: something\n" + sample("nginx-200"), wall=1.0, cpu=1.0)
    assert res.ok == 20859
    empty = load.parse_autocannon("", wall=1.0, cpu=0.0)
    assert (empty.ok, empty.bad, empty.requests_per_second) == (0, 0, 0)


def test_ratio_not_measurable_when_ceiling_below_twice_the_gateway() -> None:
    assert report.throughput_ratio(8_000, 20_000, 15_999) == report.NOT_MEASURABLE
    assert not report.measurable(8_000, 15_999)


def test_ratio_printed_when_ceiling_at_least_twice_both_figures() -> None:
    assert report.throughput_ratio(8_000, 16_000, 32_000) == "0.50"
    assert report.measurable(8_000, 16_000)


def test_ratio_is_an_upper_bound_when_only_nginx_is_near_the_ceiling() -> None:
    """nginx held down by the load tool: the true ratio is lower than the printed one."""
    assert report.throughput_ratio(8_000, 20_000, 30_000) == "≤ 0.40"


def test_ratio_is_a_lower_bound_when_only_the_gateway_is_near_the_ceiling() -> None:
    """The sequential s_time client holds the gateway at 168/s while nginx with a big CRL does 64/s."""
    assert report.throughput_ratio(168, 64, 227) == "not measurable (≥ 2.62)"
    assert report.throughput_ratio(168, 150, 227) == report.NOT_MEASURABLE


def test_throughput_target_decided_by_a_bound_only_in_the_bound_direction() -> None:
    name = "target"
    assert report.throughput_target(name, 168, 64, 227, 2.0) == (name, "≥ 2.62x (gateway held by the load tool)", True)
    assert report.throughput_target(name, 168, 100, 227, 2.0)[2] is None  # lower bound 1.68 says nothing of >= 2
    assert report.throughput_target(name, 8_000, 20_000, 30_000, 0.5) == (
        name,
        "≤ 0.40x (nginx held by the load tool)",
        False,
    )
    assert report.throughput_target(name, 8_000, 15_500, 30_000, 0.5)[2] is None  # upper bound 0.52 says nothing
    assert report.throughput_target(name, 8_000, 14_000, 40_000, 0.5) == (name, "0.57x", True)


def test_ratio_without_a_ceiling_is_printed_as_before() -> None:
    assert report.throughput_ratio(8_000, 20_000, None) == "0.40"


def _keepalive(rps: float, cpu_us: float) -> dict[str, float]:
    return {"rps": rps, "server_cpu_us": cpu_us, "p50_ms": 1.0, "p99_ms": 4.0, "non_200": 0}


def _results(ceiling_rps: float) -> dict[str, object]:
    nginx = {
        "full": {"per_second": 500.0, "server_cpu_ms": 1.0},
        "resumed": {"per_second": 1500.0, "server_cpu_ms": 0.35},
        "keepalive_50": _keepalive(20_000, 20),
        "ceiling": {
            "full": {"per_second": 600.0, "server_cpu_ms": 0.9},
            "resumed": {"per_second": 2000.0, "server_cpu_ms": 0.3},
            "keepalive_50": _keepalive(ceiling_rps, 15),
        },
    }
    gateway = {
        "full": {"per_second": 400.0, "server_cpu_ms": 1.5},
        "resumed": {"per_second": 800.0, "server_cpu_ms": 1.0},
        "keepalive_50": _keepalive(8_000, 120),
    }
    plan = {"loop": "uvloop", "handshake_seconds": 3, "keepalive_seconds": 3, "connections": [50]}
    return {"plan": plan, "figures": {"base": {"1": {"gateway": gateway, "nginx": nginx}}}}


def test_table_prints_the_ceiling_row_and_cpu_first() -> None:
    text = report.render(_results(ceiling_rps=40_000), {"date": "now"}, "./dev.sh bench --quick")
    assert "### Load generator ceiling" in text
    assert "| 1 | autocannon keep-alive, 50 conns | 40,000 req/s |" in text
    keepalive = next(line for line in text.splitlines() if line.startswith("| 1 | 50 |"))
    # CPU per request (gateway, nginx, ratio) before req/s; the ratio is measurable (40,000 >= 2 x 20,000).
    assert keepalive.startswith("| 1 | 50 | 120 | 20 | 6.00 | 8,000 | 20,000 | 40,000 | 0.40 |")
    assert "| keep-alive CPU/request <= 3x nginx (w=1, c=50) | 6.00x (120 vs 20 µs) | **not met** |" in text
    assert "| keep-alive req/s >= 50 % of nginx (w=1, c=50) | 0.40x | **not met** |" in text


def test_table_marks_the_ratio_not_measurable_under_a_low_ceiling() -> None:
    text = report.render(_results(ceiling_rps=12_000), {"date": "now"}, "./dev.sh bench --quick")
    keepalive = next(line for line in text.splitlines() if line.startswith("| 1 | 50 |"))
    assert "| 12,000 | not measurable |" in keepalive
    target = "| keep-alive req/s >= 50 % of nginx (w=1, c=50) | 0.40x as measured; ceiling 12,000 | not measurable |"
    assert target in text
    # the handshake ceiling (600/s) is below twice the gateway's 400/s as well; the CPU ratio stays
    full = next(line for line in text.splitlines() if line.startswith("| 1 | full |"))
    assert full == "| 1 | full | 1.50 | 1.00 | 1.50 | 400 | 500 | 600 | not measurable | – |"


def test_table_compares_handshakes_with_nginx_given_a_session_cache_too() -> None:
    results = _results(ceiling_rps=40_000)
    without = report.render(results, {"date": "now"}, "./dev.sh bench")
    assert "### 1b." not in without  # a results file from before the row existed still renders
    nginx = results["figures"]["base"]["1"]["nginx"]  # type: ignore[index]
    nginx["session_cache"] = {"full": {"per_second": 700.0, "server_cpu_ms": 0.75}, "resumed": {"server_cpu_ms": 0.25}}
    text = report.render(results, {"date": "now"}, "./dev.sh bench")
    assert "### 1b. The same handshakes against nginx with a session cache instead of tickets" in text
    assert "| 1 | full | 1.50 | 0.75 | 2.00 | 700 |" in text
    assert "| 1 | resumed | 1.00 | 0.25 | 4.00 | – |" in text


def test_table_prints_the_floors_beside_the_gateway() -> None:
    results = _results(ceiling_rps=40_000)
    assert "### 2b." not in report.render(results, {"date": "now"}, "./dev.sh bench")
    results["figures"]["floors"] = {  # type: ignore[index]
        "connections": 50,
        "hello": _keepalive(30_000, 50),
        "upstream-proxy": _keepalive(12_000, 80),
    }
    text = report.render(results, {"date": "now"}, "./dev.sh bench")
    assert "| hello | 50 | 2.50 | 30,000 |" in text
    assert "| upstream-proxy | 80 | 4.00 | 12,000 |" in text
    assert "| gateway (figure 2, every check) | 120 | 6.00 | – |" in text


def test_profile_stacks_are_sorted_into_layers() -> None:
    """py-spy ``--native --format raw`` lines captured from a gateway worker under keep-alive load."""
    stacks = profile.parse_collapsed((SAMPLES / "py-spy-raw-keepalive.txt").read_text())
    layers = [(profile.classify(frames), count) for frames, count in stacks]
    assert layers == [
        (None, 8),  # an executor thread waiting on its queue: not CPU
        (profile.GARBAGE, 1),  # gc traversing an httptools parser counts as gc, not as the parser
        ("kernel (system calls)", 112),  # write() under uvloop's stream write
        ("TLS (OpenSSL, ssl, uvloop's SSLProtocol)", 1),  # SSL_read_ex via the ssl module
        ("session lookup", 3),
        ("aiohttp server (protocol, routing, request, response)", 2),
        (None, 15),  # the event loop in epoll_pwait: waiting
        ("aiohttp HTTP parser and writer", 1),  # llhttp under feed_data
    ]


def test_profile_summary_leaves_waiting_threads_out_of_the_shares() -> None:
    summary = profile.summarise((SAMPLES / "py-spy-raw-keepalive.txt").read_text())
    assert (summary.samples, summary.waiting) == (120, 23)
    assert summary.layers[0] == ("kernel (system calls)", 112)
    text = profile.render("keepalive", summary, "note")
    assert "| kernel (system calls) | 93.3 % |" in text
    assert "120 samples of running code (23 of waiting threads left out)." in text


def test_percentile_is_nearest_rank() -> None:
    from bench.shared_state import percentile

    values = [float(v) for v in range(1, 101)]  # 1..100
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (50.0, 99.0, 100.0)
    assert percentile([0.3, 0.1, 0.2], 50) == 0.2  # unsorted input
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 99) == 0.0
