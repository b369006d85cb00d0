#!/usr/bin/env bash
# One entry point for people and CI. Each command sets itself up first:
#   ./dev.sh demo    run the self-contained demo (throwaway CA, backends, gateway, portal)
#   ./dev.sh test    lint, type-check and run the whole test suite (browser tests included)
#   ./dev.sh bench   run the benchmarks against nginx (bench/README.md)
#   ./dev.sh setup   only create .venv and install the system packages
set -euo pipefail
cd "$(dirname "$0")"
VENV="${GATEWAY_VENV:-.venv}"
PY="$(command -v python3.11 || command -v python3)"

# Debian packages the tests and benchmarks drive for real.
# libnss3-tools, gnutls-bin, openjdk-17-jre-headless: NSS, GnuTLS and Java read back every PKCS#12 format;
# systemd: systemd-analyze verifies the units; prometheus: promtool checks and unit-tests the alert rules;
# nodejs + npm: npm installs axe-core (pinned, in tests/e2e/.axe) for the browser suite's accessibility check.
APT_TEST=(openssl postgresql chromium chromium-driver libnss3-tools gnutls-bin openjdk-17-jre-headless systemd prometheus nodejs npm)
# nodejs + npm: autocannon (npm registry, pinned in bench/load.py) drives keep-alive load with the client
# certificate; stunnel4 + wrk only for `python -m bench.probe --tool wrk-stunnel` (the previous method);
# postgresql: `./dev.sh bench shared-state` starts a throwaway server of its own (initdb + pg_ctl).
APT_BENCH=(openssl curl nginx nodejs npm stunnel4 wrk postgresql)

need_apt() {
    local missing=()
    # A command of the package's name on PATH counts too: a nodejs build that bundles npm conflicts with Debian's npm.
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || command -v "$pkg" >/dev/null || { [ "$pkg" = nodejs ] && command -v node >/dev/null; } \
            || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        echo "==> installing ${missing[*]} (apt)" >&2
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "warning: missing system packages: ${missing[*]} (run as root or install them)" >&2
    fi
}

setup_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        echo "==> creating $VENV with $PY" >&2
        "$PY" -m venv "$VENV"
    fi
    if [ ! -f "$VENV/.installed" ] || [ pyproject.toml -nt "$VENV/.installed" ]; then
        echo "==> installing the package and its dev dependencies into $VENV" >&2
        "$VENV/bin/python" -m pip install -q --upgrade pip
        "$VENV/bin/python" -m pip install -q -e '.[dev]'
        touch "$VENV/.installed"
    fi
}

cmd="${1:-help}"; shift || true
case "$cmd" in
    setup)
        need_apt "${APT_TEST[@]}"; setup_venv ;;
    demo)
        need_apt openssl; setup_venv
        exec "$VENV/bin/gateway" demo "$@" ;;
    test)
        need_apt "${APT_TEST[@]}"; setup_venv
        echo "==> ruff" >&2
        "$VENV/bin/ruff" check gateway tests bench
        "$VENV/bin/ruff" format --check gateway tests bench
        echo "==> mypy" >&2
        "$VENV/bin/mypy"
        echo "==> pytest" >&2
        exec "$VENV/bin/pytest" "$@" ;;
    bench)
        need_apt "${APT_BENCH[@]}"; setup_venv
        exec "$VENV/bin/python" -m bench "$@" ;;
    *)
        # The usage is the command lines of the header comment, and only those.
        echo "usage: ./dev.sh COMMAND [ARGS...]" >&2
        sed -n 's/^#   \(\.\/dev\.sh .*\)$/  \1/p' "$0" >&2
        exit 2 ;;
esac
