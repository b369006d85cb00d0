"""The trivial backend both proxies forward to: gateway.demo.backend on uvloop, one process.

python -m bench.backend PORT
"""

from __future__ import annotations

import sys

from aiohttp import web

from gateway.demo.backend import build_backend
from gateway.server import install_uvloop


def main() -> None:
    install_uvloop()
    web.run_app(build_backend("bench"), host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
