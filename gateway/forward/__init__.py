"""Forwarding: which backend, is the path safe, and the hop to it.

Owns routing and path safety (``routing``, pure), the proxy handler that
streams both ways (``proxy``) and the pooled keep-alive backend client
(``upstream``). May import config, verdict, metrics and ``gateway.certs``;
never access, audit, the app or the CLI.
"""
