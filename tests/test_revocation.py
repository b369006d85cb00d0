"""CRL parsing, the serial index and the freshness rule (pure parts of gateway.certs.revocation)."""

from __future__ import annotations

import datetime as dt
import pickle

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.certs import builders as pki
from gateway.certs.revocation import CrlError, RevocationState, SerialIndex, parse_crl, serial_key

NOW = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def ca() -> tuple[pki.PrivateKey, object]:
    key = pki.generate_key()
    return key, pki.build_ca(key, now=NOW - dt.timedelta(days=1))


def crl_bytes(
    ca: tuple,
    serials: list[int],
    *,
    this_update: dt.datetime = NOW,
    hours: int = 24,
    number: int = 1,
    encoding: Encoding = Encoding.DER,
) -> bytes:
    key, cert = ca
    crl = pki.build_crl(
        cert,
        key,
        [pki.RevokedEntry(s, this_update) for s in serials],
        this_update=this_update,
        next_update=this_update + dt.timedelta(hours=hours),
        number=number,
    )
    return crl.public_bytes(encoding)


def ca_der(ca: tuple) -> list[bytes]:
    return [ca[1].public_bytes(Encoding.DER)]


def test_index_contains_exactly_the_revoked_serials() -> None:
    revoked = [pki.random_serial() for _ in range(5000)] + [1, 2, 3]
    index = SerialIndex.build(revoked)
    assert len(index) == len(set(revoked))
    assert all(s in index for s in revoked)
    assert sum(pki.random_serial() in index for _ in range(5000)) == 0
    assert 4 not in index and "1" not in index


def test_empty_index_and_pickling() -> None:
    assert 1 not in SerialIndex.build([])
    index = SerialIndex.build([10, 20])
    clone = pickle.loads(pickle.dumps(index))
    assert 10 in clone and 30 not in clone


def test_serial_key_is_never_zero_and_folds_long_serials() -> None:
    assert serial_key(0) != 0
    assert serial_key(1 << 64) != serial_key(1)


@pytest.mark.parametrize("encoding", [Encoding.DER, Encoding.PEM])
def test_parse_accepts_pem_and_der(ca: tuple, encoding: Encoding) -> None:
    snap = parse_crl(crl_bytes(ca, [7, 8], number=5, encoding=encoding), ca_der(ca), NOW)
    assert snap.entries == 2 and snap.number == 5 and 7 in snap.index


def test_parse_refuses_other_signer_garbage_and_future(ca: tuple) -> None:
    other_key = pki.generate_key()
    other = (other_key, pki.build_ca(other_key, now=NOW))
    with pytest.raises(CrlError, match="does not verify"):
        parse_crl(crl_bytes(other, [1]), ca_der(ca), NOW)
    with pytest.raises(CrlError, match="not a CRL"):
        parse_crl(b"\x30\x03garbage", ca_der(ca), NOW)
    good = crl_bytes(ca, [1])
    with pytest.raises(CrlError):
        parse_crl(good[: len(good) // 2], ca_der(ca), NOW)
    with pytest.raises(CrlError, match="in the future"):
        parse_crl(crl_bytes(ca, [1], this_update=NOW + dt.timedelta(hours=1)), ca_der(ca), NOW)


def test_state_checks_revocation_and_freshness(ca: tuple) -> None:
    snap = parse_crl(crl_bytes(ca, [42]), ca_der(ca), NOW)
    state = RevocationState(grace=dt.timedelta(hours=1)).with_snapshot(snap)
    issuer = ca[1].subject.public_bytes()
    assert state.check(43, issuer, NOW).allowed
    assert state.check(42, issuer, NOW).reason == "certificate_revoked"
    assert state.check(43, b"other issuer", NOW).reason == "revocation_unavailable"
    just_in_grace = NOW + dt.timedelta(hours=24, minutes=59)
    assert state.check(43, issuer, just_in_grace).allowed
    assert state.check(43, issuer, NOW + dt.timedelta(hours=25, seconds=1)).reason == "revocation_unavailable"
    assert state.fresh(NOW) and not state.fresh(NOW + dt.timedelta(hours=26))
    assert not RevocationState().fresh(NOW)


async def test_big_crl_file_is_parsed_in_a_child_process(ca: tuple, tmp_path) -> None:
    import os

    from gateway.certs.revocation import PROCESS_PARSE_BYTES, CrlRefresher
    from gateway.config import RevocationConfig

    serials = [pki.random_serial() for _ in range(30_000)]
    path = tmp_path / "big.crl"
    path.write_bytes(crl_bytes(ca, serials, this_update=dt.datetime.now(dt.UTC)))
    assert path.stat().st_size > PROCESS_PARSE_BYTES
    refresher = CrlRefresher(RevocationConfig(sources=(str(path),)), ca_der(ca))
    try:
        assert await refresher.refresh(str(path)) is True
        [snapshot] = refresher.state.by_issuer.values()
        assert snapshot.entries == 30_000 and serials[123] in snapshot.index
        os.utime(path)  # touched, same bytes: no new swap
        assert await refresher.refresh(str(path)) is False
        assert refresher.last_error == {}
    finally:
        await refresher.aclose()


async def test_no_parser_process_is_left_after_a_big_crl(ca: tuple, tmp_path) -> None:
    """The child that parsed a big CRL exits, and no idle replacement (~16 MiB) waits for the next one."""
    import asyncio
    import multiprocessing
    import time

    from gateway.certs.revocation import PROCESS_PARSE_BYTES, CrlRefresher
    from gateway.config import RevocationConfig

    path = tmp_path / "big.crl"
    path.write_bytes(crl_bytes(ca, [pki.random_serial() for _ in range(30_000)], this_update=dt.datetime.now(dt.UTC)))
    assert path.stat().st_size > PROCESS_PARSE_BYTES
    before = {p.pid for p in multiprocessing.active_children()}
    refresher = CrlRefresher(RevocationConfig(sources=(str(path),)), ca_der(ca))
    try:
        for number in (1, 2):  # a second, changed CRL gets a child of its own, which leaves too
            if number == 2:
                serials = [7, *(pki.random_serial() for _ in range(30_000))]
                path.write_bytes(crl_bytes(ca, serials, this_update=dt.datetime.now(dt.UTC), number=2))
            assert await refresher.refresh(str(path)) is True
            assert refresher.last_error == {}
            deadline = time.monotonic() + 15
            while (left := {p.pid for p in multiprocessing.active_children()} - before) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert left == set()
        [snapshot] = refresher.state.by_issuer.values()
        assert snapshot.number == 2 and 7 in snapshot.index
    finally:
        await refresher.aclose()


async def test_an_older_crl_from_a_second_source_never_replaces_a_newer_one(ca: tuple, tmp_path) -> None:
    from gateway.certs.revocation import CrlRefresher
    from gateway.config import RevocationConfig

    now = dt.datetime.now(dt.UTC)
    fresh, mirror = tmp_path / "fresh.crl", tmp_path / "mirror.crl"
    fresh.write_bytes(crl_bytes(ca, [1, 2], this_update=now, number=9))
    mirror.write_bytes(crl_bytes(ca, [1], this_update=now - dt.timedelta(hours=1), number=8))
    refresher = CrlRefresher(RevocationConfig(sources=(str(fresh), str(mirror))), ca_der(ca))
    try:
        await refresher.refresh_all()
        [snapshot] = refresher.state.by_issuer.values()
        assert snapshot.number == 9 and 2 in snapshot.index
        assert "older than 9" in refresher.last_error[str(mirror)]
    finally:
        await refresher.aclose()
