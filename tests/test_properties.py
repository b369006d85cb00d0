"""Property-based tests (hypothesis) over the pure parts that take hostile text.

Subject parsing and the user-ID rule, the login's exact comparison, the path
check and the cookie stripping: for *any* input, never crash, never accept
what the rule forbids.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import posixpath
import string
import warnings
from functools import cache
from urllib.parse import unquote

from cryptography import x509
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.access.policy import LoginAttempt, LoginSettings, decide_login, same_text
from gateway.certs import builders as pki
from gateway.certs.policy import USER_ID_PATTERN, PeerCertificate, check_subject, parse_peer
from gateway.forward.proxy import GATEWAY_COOKIE_PREFIX, strip_gateway_cookies
from gateway.forward.routing import check_path
from gateway.verdict import Verdict

SETTINGS = settings(deadline=None, max_examples=200, database=None, suppress_health_check=[HealthCheck.too_slow])
NOW = dt.datetime.now(dt.UTC)
ALLOWED = set(string.ascii_letters + string.digits + "._@-")


@cache
def _ca() -> tuple[x509.Certificate, pki.PrivateKey, pki.PrivateKey]:
    key = pki.generate_key()
    return pki.build_ca(key, now=NOW), key, pki.generate_key()


@cache
def _template() -> PeerCertificate:
    ca, ca_key, leaf_key = _ca()
    cert = pki.build_client_cert(ca, ca_key, leaf_key.public_key(), "LC000001", not_before=NOW)
    peer = parse_peer(cert.public_bytes(pki.serialization.Encoding.DER))
    assert peer is not None
    return peer


def _plain_id(text: str) -> bool:
    return 1 <= len(text) <= 64 and set(text) <= ALLOWED and text[0] not in "._@-"


# --- subject parsing and USER_ID_PATTERN -------------------------------------------


@SETTINGS
@given(st.text())
def test_check_subject_accepts_exactly_plain_ids(cn: str) -> None:
    peer = dataclasses.replace(_template(), common_names=(cn,))
    verdict = check_subject(peer)
    assert verdict.allowed == _plain_id(cn)
    assert verdict.allowed == bool(USER_ID_PATTERN.fullmatch(cn))


@SETTINGS
@given(st.lists(st.text(min_size=1, max_size=80), min_size=0, max_size=3))
def test_parsed_subject_round_trips_and_is_judged_by_the_rule(cns: list[str]) -> None:
    """Any CN text cryptography will encode comes back unchanged; only one plain ID passes."""
    ca, ca_key, leaf_key = _ca()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # CNs over 64 characters
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn, _validate=False) for cn in cns])
    cert = pki.build_client_cert(ca, ca_key, leaf_key.public_key(), "x", not_before=NOW, subject=subject)
    peer = parse_peer(cert.public_bytes(pki.serialization.Encoding.DER))
    assert peer is not None
    assert peer.common_names == tuple(cns)
    assert check_subject(peer).allowed == (len(cns) == 1 and _plain_id(cns[0]))


@SETTINGS
@given(st.binary(max_size=600), st.integers(min_value=0, max_value=10_000))
def test_parse_peer_never_raises_on_mangled_der(noise: bytes, where: int) -> None:
    der = _template().der
    at = where % len(der)
    mangled = der[:at] + noise + der[at + len(noise) :]
    result = parse_peer(mangled)
    assert result is None or isinstance(result, PeerCertificate)


# --- the login's exact comparison ---------------------------------------------------------


def _attempt(typed: str, subject: str) -> LoginAttempt:
    return LoginAttempt(
        certificate=Verdict.allow(),
        cert_subject=subject,
        user_id=typed,
        csrf_ok=True,
        ip_failures=0,
        locked_until=None,
        password_ok=True,
    )


@SETTINGS
@given(st.text(), st.text())
def test_any_different_user_id_is_subject_mismatch(typed: str, subject: str) -> None:
    outcome = decide_login(_attempt(typed, subject), NOW, LoginSettings())
    if typed != subject:
        assert outcome.verdict.reason == "subject_mismatch"
        assert outcome.counts_for_ip and not outcome.counts_for_user
    else:
        assert outcome.verdict.allowed


@SETTINGS
@given(
    st.text(alphabet=st.characters(blacklist_categories=())), st.text(alphabet=st.characters(blacklist_categories=()))
)
def test_same_text_is_plain_equality_even_with_surrogates(a: str, b: str) -> None:
    assert same_text(a, b) == (a == b)
    assert same_text(a, a)


# --- paths never leave their prefix -----------------------------------------------------------

PATH_PIECES = st.sampled_from(
    ["a", "b", ".", "..", "/", "%2e", "%2E", "%2f", "%5c", "%25", "%", "2e", ";", "\\", "%00", "%c0%ae", "~", "x.y"]
)


def _resolved(path: str) -> str:
    """What a lenient backend might make of a path: decode repeatedly, backslash as slash, ;params off."""
    previous = None
    while previous != path:
        previous, path = path, unquote(path, errors="replace")
    path = path.replace("\\", "/").replace("\x00", "")
    segments = [segment.split(";", 1)[0] for segment in path.split("/")]
    return posixpath.normpath("/".join(segments))


@SETTINGS
@given(st.sampled_from(["/onre/", "/nt/", "/jpxcube/"]), st.lists(PATH_PIECES, max_size=12))
def test_accepted_paths_stay_under_their_prefix(prefix: str, pieces: list[str]) -> None:
    path = prefix + "".join(pieces)
    if check_path(path).allowed:
        resolved = _resolved(path)
        assert resolved == prefix.rstrip("/") or resolved.startswith(prefix), (path, resolved)


@SETTINGS
@given(st.text())
def test_check_path_never_raises(path: str) -> None:
    assert check_path(path).reason in ("ok", "bad_request")


# --- the gateway's cookies never reach a backend ---------------------------------------------

COOKIE_NAME = st.text(alphabet=string.ascii_letters + string.digits + "_-.", min_size=1, max_size=12)
COOKIE_VALUE = st.text(alphabet=string.ascii_letters + string.digits + "_-.=/+", max_size=20)


@SETTINGS
@given(st.lists(st.tuples(st.booleans(), COOKIE_NAME, COOKIE_VALUE), max_size=8))
def test_strip_gateway_cookies_removes_ours_and_keeps_the_rest_in_order(cookies: list[tuple[bool, str, str]]) -> None:
    pairs = [((GATEWAY_COOKIE_PREFIX + name) if ours else name, value) for ours, name, value in cookies]
    header = "; ".join(f"{name}={value}" for name, value in pairs)
    kept = strip_gateway_cookies(header)
    expected = [f"{n}={v}" for n, v in pairs if not n.startswith(GATEWAY_COOKIE_PREFIX)]
    assert kept == "; ".join(expected)
    assert GATEWAY_COOKIE_PREFIX not in "".join(p.split("=", 1)[0] for p in kept.split("; "))
