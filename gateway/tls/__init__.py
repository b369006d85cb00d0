"""The connection edge: listener, TLS termination, handshake bookkeeping, client deadlines.

Owns the listening socket (``listener``), the server context with its CA
names and the handshake whose failures we can see (``termination``), and
the request-head and body timeouts aiohttp lacks (``deadlines``). May
import config, errors, metrics and ``gateway.certs``; never access,
forward, audit, the app or the CLI.
"""
