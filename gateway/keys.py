"""Typed keys for per-request state shared by the layers (certificate, login, proxy, logs)."""

from __future__ import annotations

from aiohttp import web

from gateway.certs.policy import PeerCertificate

PEER = web.RequestKey("gateway_peer", PeerCertificate)
USER = web.RequestKey("gateway_user", str)
BACKEND = web.RequestKey("gateway_backend", str)
