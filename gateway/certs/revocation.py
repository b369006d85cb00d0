"""Revocation: CRLs parsed and verified into O(1) snapshots, refreshed in the background.

The pure part (:func:`parse_crl`, :class:`SerialIndex`, :class:`RevocationState`)
turns CRL bytes into an immutable snapshot and answers "is this serial
revoked, and is the answer fresh?". The I/O part (:class:`CrlRefresher`) reads
files or URLs, parses off the event loop (a separate process for big CRLs,
so a 1,000,000-entry CRL never stalls requests), and swaps the new state in
with one assignment. A failed refresh keeps the last good CRL; a CRL past
nextUpdate + grace makes every certificate check fail closed.

One rule for a CRL that cannot be used (unreadable, bad signature, or outside
the CRL profile of :func:`parse_crl`): when a configuration is *taken*
(``gateway serve`` starting, a reload) every configured source must load, or
the configuration is refused with a message naming the source and the defect
(start-up exits, a reload keeps the running configuration); a *background
refresh* that fetches a bad CRL keeps the last good one, logs, counts and
audits the failure, and the staleness limit (nextUpdate + grace) still applies.

The index stores a 64-bit digest of each serial, not the serial: a million
entries take 16 MiB instead of ~120 MiB of Python ints. Two serials sharing a
digest would make a good certificate look revoked (refused, never wrongly
accepted); with random 64-bit digests that is ~1 in 10^13 per million.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import datetime as dt
import hashlib
import logging
import os
import time
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
from cryptography import x509

from gateway import metrics
from gateway.audit.events import serial_hex
from gateway.config import RevocationConfig
from gateway.verdict import Reason, Verdict

log = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
# Beyond this size a CRL is parsed in a child process instead of a thread.
PROCESS_PARSE_BYTES = 1 << 20
CLOCK_SKEW = dt.timedelta(minutes=5)


class CrlError(Exception):
    """A CRL could not be used; the message says why (for logs and metrics)."""


def serial_key(serial: int) -> int:
    """64-bit non-zero digest of a serial (zero marks an empty slot).

    Each 64-bit limb is mixed in with a multiply, seeded with the limb count,
    so serials that differ only above bit 64 (or in sign) get other keys.
    """
    value = serial if serial >= 0 else -serial * 2 + 1
    limbs = [value & _MASK64]
    value >>= 64
    while value:
        limbs.append(value & _MASK64)
        value >>= 64
    mixed = len(limbs)
    for limb in limbs:
        mixed = ((mixed ^ limb) * _GOLDEN) & _MASK64
        mixed ^= mixed >> 29
    return mixed or 1


class SerialIndex:
    """An open-addressing hash set of serial digests in one flat array.

    Lookups are O(1) expected (load factor <= 0.5, linear probing); memory is
    8 bytes a slot, at most 16 bytes per revoked serial.
    """

    __slots__ = ("_mask", "_table", "size")

    def __init__(self, table: array[int], size: int) -> None:
        self._table = table
        self._mask = len(table) - 1
        self.size = size

    @classmethod
    def build(cls, serials: Iterable[int]) -> SerialIndex:
        keys = array("Q", (serial_key(s) for s in serials))
        slots = 8
        while slots < len(keys) * 2:
            slots *= 2
        table = array("Q", bytes(8 * slots))
        mask, size = slots - 1, 0
        for key in keys:
            pos = key & mask
            while table[pos] and table[pos] != key:
                pos = (pos + 1) & mask
            if not table[pos]:
                table[pos] = key
                size += 1
        return cls(table, size)

    def __contains__(self, serial: object) -> bool:
        if not isinstance(serial, int):
            return False
        key = serial_key(serial)
        table, mask = self._table, self._mask
        pos = key & mask
        while True:
            slot = table[pos]
            if slot == key:
                return True
            if not slot:
                return False
            pos = (pos + 1) & mask

    def __len__(self) -> int:
        return self.size

    def __reduce__(self) -> tuple[Any, ...]:
        return (SerialIndex, (self._table, self.size))


@dataclass(frozen=True)
class CrlSnapshot:
    """One verified CRL, reduced to what a per-request check needs."""

    source: str
    issuer: bytes  # DER of the issuer Name: compared with the certificate's issuer
    issuer_text: str
    this_update: dt.datetime
    next_update: dt.datetime
    number: int | None
    index: SerialIndex = field(repr=False)
    digest: str = ""
    key_id: bytes = b""  # the signing CA's key identifier: tells apart CAs that share a name
    loaded_at: float = 0.0
    load_seconds: float = 0.0

    @property
    def entries(self) -> int:
        return len(self.index)


def _load_crl_bytes(data: bytes) -> x509.CertificateRevocationList:
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError as exc:
        raise CrlError(f"not a CRL (PEM or DER): {exc}") from exc


def parse_crl(data: bytes, ca_ders: Sequence[bytes], now: dt.datetime, source: str = "") -> CrlSnapshot:
    """Verify a CRL against the configured CAs and index its serials.

    Checks, in order: it parses; a configured CA with the CRL's issuer name
    signed it, and that CA may sign CRLs (keyUsage cRLSign, RFC 5280
    4.2.1.3); it has a nextUpdate; its thisUpdate is not in the future; it
    has a cRLNumber, not marked critical (RFC 5280 5.2.3: conforming CRL
    issuers MUST include it as non-critical).
    Staleness (nextUpdate + grace) is judged per request, not here, so a
    stale-but-authentic CRL still replaces an older one.
    """
    started = time.perf_counter()
    crl = _load_crl_bytes(data)
    signer = None
    for der in ca_ders:
        ca = x509.load_der_x509_certificate(der)
        if ca.subject == crl.issuer and crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
            signer = ca
            break
    if signer is None:
        raise CrlError(
            f"signature of CRL issued by {crl.issuer.rfc4514_string()!r} does not verify against any configured CA"
        )
    try:
        crl_sign = signer.extensions.get_extension_for_class(x509.KeyUsage).value.crl_sign
    except x509.ExtensionNotFound:
        crl_sign = False
    if not crl_sign:
        raise CrlError(f"CRL signer {signer.subject.rfc4514_string()!r} lacks the cRLSign key usage")
    next_update = crl.next_update_utc
    if next_update is None:
        raise CrlError("CRL has no nextUpdate")
    if crl.last_update_utc > now + CLOCK_SKEW:
        raise CrlError(f"CRL thisUpdate {crl.last_update_utc.isoformat()} is in the future")
    try:
        number_ext = crl.extensions.get_extension_for_class(x509.CRLNumber)
    except x509.ExtensionNotFound as exc:
        raise CrlError("CRL has no cRLNumber") from exc
    if number_ext.critical:
        raise CrlError("CRL's cRLNumber is marked critical")
    number: int | None = number_ext.value.crl_number
    index = SerialIndex.build(entry.serial_number for entry in crl)
    return CrlSnapshot(
        key_id=ca_key_id(signer),
        source=source,
        issuer=crl.issuer.public_bytes(),
        issuer_text=crl.issuer.rfc4514_string(),
        this_update=crl.last_update_utc,
        next_update=next_update,
        number=number,
        index=index,
        digest=hashlib.sha256(data).hexdigest(),
        load_seconds=time.perf_counter() - started,
    )


def ca_key_id(ca: x509.Certificate) -> bytes:
    """A CA's key identifier: its SKI (what its certificates carry as AKI), else RFC 5280's SHA-1 of the key."""
    try:
        return ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(ca.public_key()).digest


def parse_crl_file(path: str, ca_ders: Sequence[bytes], now: dt.datetime, source: str = "") -> CrlSnapshot:
    """:func:`parse_crl` on a file, read in the parser process (the worker never holds the bytes)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CrlError(f"cannot read CRL file: {exc.strerror}") from exc
    return parse_crl(data, ca_ders, now, source)


def _release_memory() -> None:
    """Hand freed heap back to the OS after a swap (glibc keeps big frees otherwise)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


@dataclass(frozen=True)
class RevocationState:
    """The CRLs in force, by issuer. Immutable: a refresh builds a new one and swaps it.

    Keyed by issuer name *and* the signing CA's key identifier: during a CA
    rollover the old and the new CA usually share a name, and a certificate
    from one must never be judged by the other's CRL.
    """

    by_issuer: Mapping[bytes, CrlSnapshot] = field(default_factory=dict)
    grace: dt.timedelta = dt.timedelta(hours=1)

    def with_snapshot(self, snapshot: CrlSnapshot) -> RevocationState:
        return replace(self, by_issuer={**self.by_issuer, snapshot.issuer + snapshot.key_id: snapshot})

    def find(self, issuer: bytes, key_id: bytes | None = None) -> CrlSnapshot | None:
        """The CRL for an issuer name and (when the certificate names it) the issuing key.

        Without a key identifier the name must be unambiguous; a snapshot
        without one (built by hand) matches any key of its name.
        """
        if key_id:
            exact = self.by_issuer.get(issuer + key_id)  # a Name's DER is self-delimiting
            if exact is not None:
                return exact
        matches = [s for s in self.by_issuer.values() if s.issuer == issuer and not (key_id and s.key_id)]
        return matches[0] if len(matches) == 1 else None

    def check(self, serial: int, issuer: bytes, now: dt.datetime, key_id: bytes | None = None) -> Verdict:
        """Is this serial from this issuer revoked? Refuses when the answer is not fresh."""
        snapshot = self.find(issuer, key_id)
        if snapshot is None:
            return Verdict.deny(Reason.REVOCATION_UNAVAILABLE, "no CRL loaded for the issuer")
        if now > snapshot.next_update + self.grace:
            return Verdict.deny(
                Reason.REVOCATION_UNAVAILABLE,
                f"CRL from {snapshot.source} past nextUpdate {snapshot.next_update.isoformat()} + grace",
            )
        if serial in snapshot.index:
            return Verdict.deny(Reason.CERTIFICATE_REVOKED, f"serial {serial_hex(serial)} is on the CRL")
        return Verdict.allow()

    def fresh(self, now: dt.datetime) -> bool:
        """At least one CRL loaded and none past nextUpdate + grace (for /healthz)."""
        return bool(self.by_issuer) and all(now <= s.next_update + self.grace for s in self.by_issuer.values())


# ---------------------------------------------------------------------------
# I/O: reading sources and refreshing in the background.


@dataclass
class _SourceState:
    """What we last saw of one source, to skip unchanged files and use HTTP validators."""

    stat: tuple[int, int, int] | None = None
    etag: str | None = None
    last_modified: str | None = None
    digest: str | None = None
    number: int | None = None


class HourlyWarning:
    """Says "due" at most once per ``interval``: a warning for a window, not one per request or refresh."""

    def __init__(self, interval: float = 3600.0, clock: Any = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._last: float | None = None

    def due(self) -> bool:
        now = self._clock()
        if self._last is not None and now - self._last < self.interval:
            return False
        self._last = now
        return True


class CrlRefresher:
    """Loads every configured CRL source and keeps the state fresh.

    ``on_swap`` receives each new :class:`RevocationState`; ``state`` is the
    current one. Refresh failures keep the old CRL and are logged and counted.
    """

    def __init__(
        self,
        config: RevocationConfig,
        ca_ders: Sequence[bytes],
        *,
        on_failure: Any = None,
    ) -> None:
        self.config = config
        self.ca_ders = list(ca_ders)
        self.state = RevocationState(grace=dt.timedelta(seconds=config.grace_seconds))
        self._sources = {source: _SourceState() for source in config.sources}
        self._validators: dict[str, tuple[str | None, str | None]] = {}
        self._on_failure = on_failure
        self._pools: set[concurrent.futures.ProcessPoolExecutor] = set()  # parses in flight
        self._session: aiohttp.ClientSession | None = None
        self.last_error: dict[str, str] = {}
        self.lapse_warning = HourlyWarning()

    async def refresh_all(self) -> None:
        for source in self.config.sources:
            await self.refresh(source)

    async def refresh(self, source: str) -> bool:
        """Load one source if it changed; True when a new CRL was swapped in."""
        try:
            data = await self._read(source)
            if data is None:
                return False
            snapshot = await self._parse(data, source)
            if snapshot.digest == self._sources[source].digest:
                self._keep_validators(source)
                return False  # touched, not changed
            self._accept(source, snapshot)
            self._keep_validators(source)
            _release_memory()
        except CrlError as exc:
            self._validators.pop(source, None)
            self._fail(source, str(exc))
            return False
        except Exception as exc:
            self._validators.pop(source, None)
            self._fail(source, f"unexpected {type(exc).__name__}: {exc}")
            return False
        self.last_error.pop(source, None)
        return True

    def _keep_validators(self, source: str) -> None:
        """Remember an HTTP source's ETag/Last-Modified only once its CRL was taken."""
        etag, last_modified = self._validators.pop(source, (None, None))
        seen = self._sources[source]
        seen.etag, seen.last_modified = etag, last_modified

    def _accept(self, source: str, snapshot: CrlSnapshot) -> None:
        seen = self._sources[source]
        if seen.number is not None and snapshot.number is not None and snapshot.number < seen.number:
            raise CrlError(f"CRL number {snapshot.number} is older than the loaded {seen.number}")
        # Two sources for one CA (a file and a lagging mirror): never step back.
        current = self.state.find(snapshot.issuer, snapshot.key_id)
        if current is not None and current.source != source:
            if current.number is not None and snapshot.number is not None and snapshot.number < current.number:
                raise CrlError(f"CRL number {snapshot.number} is older than {current.number} from {current.source}")
            if snapshot.this_update < current.this_update:
                raise CrlError(f"CRL thisUpdate is older than the one from {current.source}")
        seen.digest, seen.number = snapshot.digest, snapshot.number
        snapshot = replace(snapshot, loaded_at=time.time())
        self.state = self.state.with_snapshot(snapshot)
        metrics.CRL_REFRESHES.labels(source).inc()
        metrics.CRL_ENTRIES.labels(source).set(snapshot.entries)
        metrics.CRL_NEXT_UPDATE.labels(source).set(snapshot.next_update.timestamp())
        metrics.CRL_LOAD_SECONDS.labels(source).set(snapshot.load_seconds)
        self.update_age_metrics()
        log.info(
            "crl loaded",
            extra={
                "source": source,
                "entries": snapshot.entries,
                "crl_number": snapshot.number,
                "next_update": snapshot.next_update.isoformat(),
                "load_seconds": round(snapshot.load_seconds, 3),
            },
        )

    def update_age_metrics(self) -> None:
        now = time.time()
        for snap in self.state.by_issuer.values():
            metrics.CRL_AGE.labels(snap.source).set(now - snap.this_update.timestamp())
            left = snap.next_update.timestamp() - now
            metrics.CRL_SECONDS_TO_NEXT_UPDATE.labels(snap.source).set(left)
            if self.config.warn_before_next_update > 0 and left < self.config.warn_before_next_update:
                self._warn_lapse(snap, left)

    def _warn_lapse(self, snap: CrlSnapshot, left: float) -> None:
        """Silence before the lapse is the trap: say so in the log, once an hour (not per request)."""
        if self.lapse_warning.due():
            log.warning(
                "CRL close to nextUpdate: nobody re-signed it; past nextUpdate + grace every user is refused "
                "(run the CRL timer or the portal on the CA host)",
                extra={"source": snap.source, "next_update": snap.next_update.isoformat(), "seconds_left": int(left)},
            )

    def _fail(self, source: str, why: str) -> None:
        self.last_error[source] = why
        metrics.CRL_REFRESH_FAILURES.labels(source).inc()
        log.error("crl refresh failed; keeping the last good CRL", extra={"source": source, "error": why})
        if self._on_failure is not None:
            self._on_failure(source, why)

    async def _read(self, source: str) -> bytes | Path | None:
        if source.startswith(("http://", "https://")):
            return await self._fetch(source)
        return await asyncio.get_running_loop().run_in_executor(None, self._read_file, source)

    def _read_file(self, source: str) -> bytes | Path | None:
        """The file's bytes, or its path when big (the parser process reads it), or None if unchanged."""
        seen = self._sources[source]
        try:
            st = os.stat(source)
            key = (st.st_mtime_ns, st.st_size, st.st_ino)
            if key == seen.stat and seen.digest is not None:
                return None
            if st.st_size > self.config.max_bytes:
                raise CrlError(f"CRL file is {st.st_size} bytes, over revocation.max_bytes")
            if st.st_size > PROCESS_PARSE_BYTES:
                seen.stat = key
                return Path(source)
            data = Path(source).read_bytes()
        except OSError as exc:
            raise CrlError(f"cannot read CRL file: {exc.strerror}") from exc
        seen.stat = key
        if hashlib.sha256(data).hexdigest() == seen.digest:
            return None
        return data

    async def _fetch(self, url: str) -> bytes | None:
        seen = self._sources[url]
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.fetch_timeout))
        headers = {}
        if seen.digest is not None and seen.etag:
            headers["If-None-Match"] = seen.etag
        if seen.digest is not None and seen.last_modified:
            headers["If-Modified-Since"] = seen.last_modified
        try:
            async with self._session.get(url, headers=headers) as resp:
                if resp.status == 304:
                    return None
                if resp.status != 200:
                    raise CrlError(f"HTTP {resp.status} from CRL URL")
                if (resp.content_length or 0) > self.config.max_bytes:
                    raise CrlError("CRL response larger than revocation.max_bytes")
                data = bytearray()
                async for chunk in resp.content.iter_chunked(1 << 16):
                    data += chunk
                    if len(data) > self.config.max_bytes:
                        raise CrlError("CRL response larger than revocation.max_bytes")
                self._validators[url] = (resp.headers.get("ETag"), resp.headers.get("Last-Modified"))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise CrlError(f"cannot fetch CRL: {type(exc).__name__}: {exc}") from exc
        return bytes(data)

    async def _parse(self, data: bytes | Path, source: str) -> CrlSnapshot:
        now = dt.datetime.now(dt.UTC)
        if isinstance(data, Path) or len(data) > PROCESS_PARSE_BYTES:
            return await self._parse_in_child(data, source, now)
        return await asyncio.get_running_loop().run_in_executor(None, parse_crl, data, self.ca_ders, now, source)

    async def _parse_in_child(self, data: bytes | Path, source: str, now: dt.datetime) -> CrlSnapshot:
        """A big CRL goes to a child process of its own, shut down once it answered.

        The parser's peak memory leaves with the child, and no idle child
        (~16 MiB; ``max_tasks_per_child`` would start a replacement at once)
        waits for the next big CRL. multiprocessing is imported only here: a
        worker whose CRLs are all small never holds it.
        """
        import multiprocessing
        from concurrent.futures.process import BrokenProcessPool

        pool = concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        self._pools.add(pool)
        loop = asyncio.get_running_loop()
        try:
            if isinstance(data, Path):
                return await loop.run_in_executor(pool, parse_crl_file, str(data), self.ca_ders, now, source)
            return await loop.run_in_executor(pool, parse_crl, data, self.ca_ders, now, source)
        except BrokenProcessPool as exc:
            raise CrlError("CRL parser process died") from exc
        finally:
            self._pools.discard(pool)
            pool.shutdown(wait=False)

    async def run(self) -> None:
        """Refresh every ``refresh_seconds`` until cancelled."""
        while True:
            await asyncio.sleep(self.config.refresh_seconds)
            await self.refresh_all()
            self.update_age_metrics()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
        for pool in self._pools:
            pool.shutdown(wait=False, cancel_futures=True)
