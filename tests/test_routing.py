"""Routing and path safety (pure)."""

from __future__ import annotations

import pytest

from gateway.config import Backend
from gateway.forward.routing import Router, check_path, normalise_host

BACKENDS = [
    Backend("tdnet", "/onre/", "http://a"),
    Backend("tdnet-api", "/onre/api/", "http://b", system="tdnet"),
    Backend("clearing", "/", "http://c", host="clearing.example.jp"),
]


@pytest.mark.parametrize(
    ("host", "path", "name"),
    [
        ("gw", "/onre/x", "tdnet"),
        ("gw", "/onre/api/x", "tdnet-api"),
        ("gw", "/onre", "tdnet"),
        ("clearing.example.jp:8443", "/onre/x", "clearing"),
        ("gw", "/nt/", None),
        (None, "/onrex", None),
    ],
)
def test_longest_prefix_and_host(host: str | None, path: str, name: str | None) -> None:
    match = Router(BACKENDS).match(host, path)
    assert (match.name if match else None) == name


def test_normalise_host() -> None:
    assert normalise_host("Example.JP:443") == "example.jp"
    assert normalise_host("[::1]:8443") == "[::1]"
    assert normalise_host("") is None


@pytest.mark.parametrize("path", ["/onre/a", "/onre/a.b/c", "/onre/?q=../x", "/"])
def test_safe_paths(path: str) -> None:
    assert check_path(path).allowed


@pytest.mark.parametrize(
    "path",
    [
        "/onre/../x",
        "/onre/./x",
        "/onre/%2e%2E/x",
        "/onre/a%2fb",
        "/onre/a%5cb",
        "/onre/%252e",
        "/onre/a\\b",
        "/onre//x",
        "onre/x",
        "http://evil/x",
        "/a b",
        "/a%00",
    ],
)
def test_unsafe_paths(path: str) -> None:
    assert check_path(path).reason == "bad_request"
