"""Tamper evidence for the audit trail: hash chains, signed checkpoints and their verification (pure, no I/O).

Each instance's events form one chain: event ``seq`` (1, 2, 3, ...) carries
``prev_hash``, the ``hash`` of event ``seq - 1`` (:data:`GENESIS` for the
first), and its own ``hash``, the SHA-256 of its canonical encoding. Changing,
removing, inserting or reordering an event breaks the chain at that event.
A chain alone can be rewritten from the change onwards by anyone who knows
this module, so at intervals and at shutdown each instance signs a
*checkpoint* (instance, last seq, last hash, time) with the Ed25519 audit
key: everything up to a checkpoint is vouched for by the key, events after
the latest checkpoint only by the chain. Pruning signs a *prune anchor*
("events up to seq N, hash H were deleted on purpose") before deleting, so
what remains starts from a signed point.

Canonical encoding of an event (version 1), the bytes that are hashed::

    "gateway-audit-event-v1" NUL instance NUL seq NUL prev_hash NUL event NUL reason NUL time NUL ... NUL detail

* Fields in the fixed order of :data:`ENCODED_FIELDS` (the header, then
  :data:`BODY_FIELDS`, the order :class:`~gateway.audit.events.AuditEvent`
  declared them in when version 1 was fixed). A new event field means a new
  version, never a silent change (a test pins the list).
* Values as :func:`~gateway.audit.events.event_to_dict` serialises them,
  ``time`` therefore as UTC at millisecond precision in the fixed 24-character
  form ``2026-11-30T04:50:12.345Z`` (the same instant as epoch milliseconds,
  in the form every store and export already holds).
* Integers (``seq``, ``client_port``, ``worker``) as ASCII decimal; None (only
  an integer field may be None) as the empty field: an integer is never
  empty, so the two cannot be confused. Text as UTF-8 (lone surrogates,
  which only a hostile header can carry, in Python's ``surrogatepass`` form).
* Separator NUL (0x00). Inside a value a backslash becomes ``\\\\`` and a
  NUL ``\\0`` first, so no value can contain the separator and no text can
  pose as two fields: the encoding is injective.
* ``prev_hash`` and ``hash``: 64 lower-case hex digits; ``hash`` is
  ``sha256(encoding).hexdigest()``.

Checkpoints and anchors are signed over the same kind of encoding with
their own tag (``gateway-audit-checkpoint-v1`` or ``gateway-audit-prune-v1``),
so a checkpoint's signature can never pass as an anchor (which would let a
head deletion verify). See docs/audit-integrity.md.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from operator import itemgetter
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gateway.audit.events import format_time
from gateway.errors import GatewayError

EVENT_TAG = "gateway-audit-event-v1"
GENESIS = "0" * 64  # prev_hash of seq 1
HEADER_FIELDS = ("instance", "seq", "prev_hash")
# AuditEvent's fields as of version 1, in declaration order, without `instance` (it is in the header).
BODY_FIELDS: tuple[str, ...] = (
    "event",
    "reason",
    "time",
    "support_id",
    "client_ip",
    "client_port",
    "tls_version",
    "tls_cipher",
    "backend",
    "method",
    "path",
    "user_id",
    "cert_subject",
    "cert_serial",
    "cert_issuer",
    "cert_fingerprint",
    "cert_not_after",
    "user_agent",
    "worker",
    "actor",
    "detail",
)
ENCODED_FIELDS = (*HEADER_FIELDS, *BODY_FIELDS)
CHAIN_FIELDS = (*HEADER_FIELDS, "hash")  # what a chained event adds to the serialised event

_SEP = "\x00"
_EVENT_PREFIX = (EVENT_TAG + _SEP).encode()
_GET_ALL = itemgetter(*ENCODED_FIELDS)
_GET_BODY = itemgetter(*BODY_FIELDS)
_SEQ = ENCODED_FIELDS.index("seq")
_PORT = ENCODED_FIELDS.index("client_port")
_WORKER = ENCODED_FIELDS.index("worker")
_BODY_PORT = BODY_FIELDS.index("client_port")
_BODY_WORKER = BODY_FIELDS.index("worker")


# -- The canonical encoding -----------------------------------------------------


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(_SEP, "\\0")


def _join(values: list[Any]) -> bytes:
    """NUL-joined, escaped, UTF-8. Fast path: one C-level join when no value needs escaping."""
    text = _SEP.join(values)  # TypeError when a text field holds a non-string: the caller reports it
    if text.count(_SEP) != len(values) - 1 or "\\" in text:
        text = _SEP.join(map(_escape, values))
    return text.encode("utf-8", "surrogatepass")


def _number(value: Any) -> str:
    return "" if value is None else str(value)


def encode_event(record: Mapping[str, Any]) -> bytes:
    """The canonical bytes of a chained event (its serialised form plus instance, seq, prev_hash)."""
    values = list(_GET_ALL(record))
    values[_SEQ] = str(values[_SEQ])
    port, worker = values[_PORT], values[_WORKER]
    values[_PORT] = "" if port is None else str(port)
    values[_WORKER] = "" if worker is None else str(worker)
    return _EVENT_PREFIX + _join(values)


def encode_body(fields: Mapping[str, Any]) -> bytes:
    """The event's part of the encoding, computable before seq and prev_hash are known (outside a lock)."""
    return encode_body_values(list(_GET_BODY(fields)))


def encode_body_values(values: list[Any]) -> bytes:
    """:func:`encode_body` of the values in :data:`BODY_FIELDS` order (a store's row, no dict); ``values`` is reused."""
    port, worker = values[_BODY_PORT], values[_BODY_WORKER]
    values[_BODY_PORT] = "" if port is None else str(port)
    values[_BODY_WORKER] = "" if worker is None else str(worker)
    return _join(values)


def link(prev_hash: str, instance: str, seq: int, body: bytes) -> str:
    """The hash of event ``seq`` of ``instance`` whose body is ``body`` (from :func:`encode_body`)."""
    header = _join([EVENT_TAG, instance, str(seq), prev_hash])
    return hashlib.sha256(header + b"\x00" + body).hexdigest()


def event_hash(record: Mapping[str, Any]) -> str:
    return hashlib.sha256(encode_event(record)).hexdigest()


@dataclass(frozen=True, slots=True)
class Head:
    """Where a chain stands: its last seq and hash (seq 0 and GENESIS before the first event)."""

    instance: str
    seq: int = 0
    hash: str = GENESIS


def link_batch(head: Head, bodies: Sequence[bytes]) -> tuple[list[tuple[int, str, str]], Head]:
    """(seq, prev_hash, hash) for each body chained onto ``head``, and the new head: what a store's append runs.

    The bodies (:func:`encode_body`) can be computed before the store's lock
    is taken; this loop is all that runs under it. Same bytes as :func:`link`,
    with the header's constant part built once per batch.
    """
    sha256 = hashlib.sha256
    prefix = _join([EVENT_TAG, head.instance]) + b"\x00"
    seq, prev = head.seq, head.hash
    previous = _join([prev])  # the stored head is escaped like any value; our own digests are plain hex
    out = []
    for body in bodies:
        seq += 1
        digest = sha256(b"%s%d\x00%s\x00%s" % (prefix, seq, previous, body)).hexdigest()
        out.append((seq, prev, digest))
        prev, previous = digest, digest.encode()
    return out, Head(head.instance, seq, prev)


def extend(head: Head, events: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], Head]:
    """Chain serialised events onto ``head``: each gets instance, seq, prev_hash and hash; and the new head."""
    links, new_head = link_batch(head, [encode_body(fields) for fields in events])
    out = [
        {**fields, "instance": head.instance, "seq": seq, "prev_hash": prev, "hash": digest}
        for fields, (seq, prev, digest) in zip(events, links, strict=True)
    ]
    return out, new_head


# -- Checkpoints and prune anchors -------------------------------------------------


class MarkKind(StrEnum):
    """A signed statement about a chain."""

    CHECKPOINT = "checkpoint"  # "the chain of INSTANCE reached SEQ with HASH at TIME"
    PRUNE = "prune"  # "events of INSTANCE up to SEQ (last HASH) were pruned on purpose at TIME"


_MARK_TAGS = {MarkKind.CHECKPOINT: "gateway-audit-checkpoint-v1", MarkKind.PRUNE: "gateway-audit-prune-v1"}


@dataclass(frozen=True, slots=True)
class Mark:
    """A checkpoint or prune anchor. ``time`` is ISO UTC text with milliseconds; ``signature`` base64."""

    kind: MarkKind
    instance: str
    seq: int
    hash: str
    time: str
    key_id: str = ""
    signature: str = ""

    def signed_bytes(self) -> bytes:
        """What the signature covers: tag, instance, seq, hash, time, key id (NUL-separated, escaped)."""
        return _join([_MARK_TAGS[self.kind], self.instance, str(self.seq), self.hash, self.time, self.key_id])

    def describe(self) -> str:
        return f"{self.kind} at seq {self.seq} ({self.time})"


def checkpoint(head: Head, when: dt.datetime, private_key: Ed25519PrivateKey) -> Mark:
    """The signed checkpoint of a chain's head (hourly and at shutdown)."""
    return sign(Mark(MarkKind.CHECKPOINT, head.instance, head.seq, head.hash, format_time(when)), private_key)


def prune_anchor(last_pruned: Head, when: dt.datetime, private_key: Ed25519PrivateKey) -> Mark:
    """The signed anchor for pruning up to and including ``last_pruned`` (written before the delete)."""
    return sign(
        Mark(MarkKind.PRUNE, last_pruned.instance, last_pruned.seq, last_pruned.hash, format_time(when)), private_key
    )


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short name for a public key: the first 16 hex digits of SHA-256 over its raw 32 bytes."""
    return hashlib.sha256(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()[:16]


def sign(mark: Mark, private_key: Ed25519PrivateKey) -> Mark:
    """``mark`` with the key's id and an Ed25519 signature over :meth:`Mark.signed_bytes`."""
    named = dataclasses.replace(mark, key_id=key_id(private_key.public_key()), signature="")
    return dataclasses.replace(named, signature=base64.b64encode(private_key.sign(named.signed_bytes())).decode())


def signature_problem(mark: Mark, public_key: Ed25519PublicKey) -> str:
    """Why ``mark``'s signature does not hold under ``public_key``, or ''."""
    expected = key_id(public_key)
    if mark.key_id != expected:
        return f"signed by key {mark.key_id or '(none)'}, not by the audit key {expected}"
    try:
        public_key.verify(base64.b64decode(mark.signature, validate=True), mark.signed_bytes())
    except (InvalidSignature, ValueError):
        return "the signature does not match its content"
    return ""


# -- Verification ----------------------------------------------------------------


class FindingKind(StrEnum):
    """Why a trail does not verify. The chain kinds name the first bad event of an instance."""

    MODIFIED = "modified"  # the event no longer hashes to its hash, or was re-hashed (the next does not link)
    REMOVED = "removed"  # seq missing, the events around it present
    INSERTED = "inserted"  # a second event claims a seq, or an appended event does not link to the last
    REORDERED = "reordered"  # the event is present, but not where the chain puts it
    TRUNCATED = "truncated"  # the chain ends before a signed checkpoint or anchor says it reached
    BAD_SIGNATURE = "bad_signature"  # a checkpoint or anchor not signed by the audit key
    CHECKPOINT_MISMATCH = "checkpoint_mismatch"  # a signed checkpoint's (seq, hash) is not on the chain


@dataclass(frozen=True, slots=True)
class Finding:
    instance: str
    kind: FindingKind
    seq: int | None
    support_id: str = ""
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ChainSummary:
    """What was verified of one instance's chain."""

    instance: str
    events: int
    start: str  # "genesis", "prune anchor at seq N (...)" or "checkpoint at seq N (...)"
    last_seq: int
    last_hash: str
    checkpoints: int  # checkpoints and anchors with a good signature
    signed_up_to: int  # the highest seq a good signature vouches for (events after it: chain only)


@dataclass(frozen=True, slots=True)
class Report:
    chains: tuple[ChainSummary, ...]
    findings: tuple[Finding, ...]

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "chains": [dataclasses.asdict(c) for c in self.chains],
            "findings": [{**dataclasses.asdict(f), "kind": str(f.kind)} for f in self.findings],
        }


def verify_chain(
    events_by_instance: Mapping[str, Sequence[Mapping[str, Any]]],
    checkpoints: Iterable[Mark],
    anchors: Iterable[Mark],
    public_key: Ed25519PublicKey,
    *,
    partial: bool = False,
    trusted: Mapping[str, Head] | None = None,
) -> Report:
    """Verify every instance's chain against the signed checkpoints and anchors.

    Events are given per instance in storage order (file order, or insertion
    order in a table), not sorted by seq: sorting would hide a reordering.
    A chain may start at genesis or right after a good prune anchor; with
    ``partial`` (an export or ``--since``) also right after a good checkpoint.
    Per instance the first bad event is reported, plus every checkpoint or
    anchor whose signature or position is wrong.

    ``trusted``: per instance, a head this process verified itself a moment
    ago (the report pages' cache); that chain continues from it, and its
    events are those after it. Never a head read from the trail itself.
    """
    marks = [*checkpoints, *anchors]
    good: dict[str, list[Mark]] = {}
    findings: list[Finding] = []
    for mark in marks:
        problem = signature_problem(mark, public_key)
        if problem:
            findings.append(
                Finding(mark.instance, FindingKind.BAD_SIGNATURE, mark.seq, "", f"{mark.describe()}: {problem}")
            )
        else:
            good.setdefault(mark.instance, []).append(mark)
    chains = []
    for instance in sorted({*events_by_instance, *(m.instance for m in marks)}):
        summary, found = _verify_instance(
            instance,
            events_by_instance.get(instance, ()),
            good.get(instance, []),
            partial,
            (trusted or {}).get(instance),
        )
        chains.append(summary)
        findings += found
    findings.sort(key=lambda f: (f.instance, f.seq if f.seq is not None else -1))
    return Report(tuple(chains), tuple(findings))


def _verify_instance(
    instance: str, records: Sequence[Mapping[str, Any]], marks: list[Mark], partial: bool, trusted: Head | None
) -> tuple[ChainSummary, list[Finding]]:
    marks = sorted(marks, key=lambda m: m.seq)
    start = None if trusted is not None else _start(records, marks, partial)
    walk = _Walk(instance, records, start, marks, trusted)
    finding = walk.run()
    findings = [*walk.mismatches]
    if finding is None:
        finding = _truncation(instance, walk.head, marks)
    if finding is not None:
        findings.insert(0, finding)
    contradicted = {f.seq for f in walk.mismatches}
    summary = ChainSummary(
        instance=instance,
        events=len(records),
        start=(
            f"seq {trusted.seq} (verified before)"
            if trusted is not None
            else "genesis"
            if start is None
            else start.describe()
        ),
        last_seq=walk.head.seq,
        last_hash=walk.head.hash,
        checkpoints=len(marks),
        signed_up_to=max((m.seq for m in marks if m.seq <= walk.head.seq and m.seq not in contradicted), default=0),
    )
    return summary, findings


def _start(records: Sequence[Mapping[str, Any]], marks: list[Mark], partial: bool) -> Mark | None:
    """The signed point the chain continues from: the latest allowed mark before the first event, or genesis."""
    if not records:  # everything pruned (or, partial, nothing since the checkpoint)
        first: int | None = None
    else:
        first = _seq_of(records[0])
        if first is None:
            return None
    allowed = [m for m in marks if (first is None or m.seq < first) and (partial or m.kind is MarkKind.PRUNE)]
    return allowed[-1] if allowed else None


def _truncation(instance: str, head: Head, marks: list[Mark]) -> Finding | None:
    beyond = [m for m in marks if m.seq > head.seq]
    if not beyond:
        return None
    detail = f"the chain ends at seq {head.seq}, but the {beyond[-1].describe()} vouches for more"
    return Finding(instance, FindingKind.TRUNCATED, head.seq + 1, "", detail)


def _seq_of(record: Mapping[str, Any]) -> int | None:
    seq = record.get("seq")
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


class _Walk:
    """One pass over an instance's events in storage order; anomalies are diagnosed with a full index."""

    def __init__(
        self,
        instance: str,
        records: Sequence[Mapping[str, Any]],
        start: Mark | None,
        marks: list[Mark],
        trusted: Head | None = None,
    ):
        self.instance = instance
        self.records = records
        self.head = trusted or (Head(instance, start.seq, start.hash) if start is not None else Head(instance))
        self.pending = [m for m in marks if m.seq > self.head.seq]  # position checks still to do, by seq
        self.mismatches: list[Finding] = []
        self._seqs: list[int | None] | None = None

    def run(self) -> Finding | None:
        forged = self._forged_duplicates()
        first_forged = min(forged, key=lambda i: _seq_of(self.records[i]) or 0) if forged else None
        finding = self._walk(forged)
        if first_forged is not None:
            record = self.records[first_forged]
            seq = _seq_of(record)
            if finding is None or (finding.seq is not None and seq is not None and seq <= finding.seq):
                return self._finding(
                    FindingKind.INSERTED, record, "a second event with this seq; the chain runs through the other"
                )
        return finding

    def _walk(self, skip: set[int]) -> Finding | None:
        records = self.records
        last = len(records) - 1
        next_mark = self.pending[0].seq if self.pending else -1
        seq, prev = self.head.seq, self.head.hash
        sha256, encode = hashlib.sha256, encode_event  # locals: this loop is the verify speed
        for i, record in enumerate(records):
            if skip and i in skip:
                continue
            try:
                digest = sha256(encode(record)).hexdigest()
            except (KeyError, TypeError, ValueError, UnicodeError):
                digest = ""  # malformed: cannot be the event that was hashed
            got = record.get("seq")
            if (
                got != seq + 1
                or type(got) is not int
                or digest != record.get("hash")
                or record.get("prev_hash") != prev
            ):
                self.head = Head(self.instance, seq, prev)
                return self._anomaly(i, i == last, digest)
            seq, prev = got, digest
            if seq == next_mark:
                next_mark = self._check_marks(seq, prev)
        self.head = Head(self.instance, seq, prev)
        return None

    def _anomaly(self, index: int, is_last: bool, digest: str) -> Finding:
        """The first event that does not continue the chain, checked in order: place, content, link."""
        record = self.records[index]
        if record.get("seq") != self.head.seq + 1 or type(record.get("seq")) is not int:
            return self._out_of_place(index, self.head.seq + 1)
        if digest != record.get("hash"):
            return self._finding(FindingKind.MODIFIED, record, "does not hash to its recorded hash")
        return self._broken_link(index, is_last)

    def _check_marks(self, seq: int, digest: str) -> int:
        while self.pending and self.pending[0].seq == seq:
            mark = self.pending.pop(0)
            if mark.hash != digest:
                detail = f"{mark.describe()} names hash {mark.hash[:16]}..., the chain has {digest[:16]}..."
                self.mismatches.append(Finding(self.instance, FindingKind.CHECKPOINT_MISMATCH, seq, "", detail))
        return self.pending[0].seq if self.pending else -1

    def _out_of_place(self, index: int, expected: int) -> Finding:
        record = self.records[index]
        got = _seq_of(record)
        if got is None:
            return self._finding(FindingKind.MODIFIED, record, "its seq is not a whole number")
        if got < expected:
            return self._finding(FindingKind.INSERTED, record, f"seq {got} again, after seq {expected - 1}")
        later = [i for i in range(index + 1, len(self.records)) if self._seq(i) == expected]
        if later:
            where = f"found later in storage order, seq {got} stands in its place"
            return self._finding(FindingKind.REORDERED, self.records[later[0]], where)
        detail = f"missing: seq {expected - 1} is followed by seq {got}"
        return Finding(self.instance, FindingKind.REMOVED, expected, "", detail)

    def _broken_link(self, index: int, is_last: bool) -> Finding:
        """The event hashes fine but does not continue the chain: which one to blame."""
        record = self.records[index]
        if is_last:
            return self._finding(FindingKind.INSERTED, record, "appended, but does not link to the event before it")
        previous = self._previous(index)
        if previous is None:
            return self._finding(FindingKind.MODIFIED, record, "does not continue from where the chain starts")
        detail = f"altered and re-hashed: seq {_seq_of(record)} was chained to another hash"
        return self._finding(FindingKind.MODIFIED, previous, detail)

    def _previous(self, index: int) -> Mapping[str, Any] | None:
        want = self.head.seq
        for i in range(index - 1, -1, -1):
            if self._seq(i) == want:
                return self.records[i]
        return None

    def _forged_duplicates(self) -> set[int]:
        """Indexes of events claiming a seq another event holds: all but the one the chain runs through."""
        try:  # the common case, at C speed: no seq twice
            if len({r.get("seq") for r in self.records}) == len(self.records):
                return set()
        except TypeError:
            pass  # an unhashable seq (a hostile file): the careful way below
        seqs = self._all_seqs()
        by_seq: dict[int | None, list[int]] = {}
        for i, seq in enumerate(seqs):
            by_seq.setdefault(seq, []).append(i)
        forged: set[int] = set()
        for seq, indexes in by_seq.items():
            if len(indexes) > 1 and seq is not None:
                genuine = self._genuine(seq, indexes, by_seq)
                forged |= {i for i in indexes if i != genuine}
        return forged

    def _genuine(self, seq: int, indexes: list[int], by_seq: Mapping[int | None, list[int]]) -> int:
        """Of several events with one seq: the intact one the next event links to, else the one linking back."""
        intact = [i for i in indexes if _intact(self.records[i])] or indexes
        next_prev = {self.records[j].get("prev_hash") for j in by_seq.get(seq + 1, [])}
        prev_hashes = {self.records[j].get("hash") for j in by_seq.get(seq - 1, [])} or {self.head.hash}
        for key, wanted in (("hash", next_prev), ("prev_hash", prev_hashes)):
            linked = [i for i in intact if self.records[i].get(key) in wanted]
            if linked:
                return linked[0]
        return intact[0]

    def _all_seqs(self) -> list[int | None]:
        if self._seqs is None:
            self._seqs = [_seq_of(r) for r in self.records]
        return self._seqs

    def _seq(self, index: int) -> int | None:
        return self._all_seqs()[index]

    def _finding(self, kind: FindingKind, record: Mapping[str, Any], detail: str) -> Finding:
        support_id = record.get("support_id")
        return Finding(self.instance, kind, _seq_of(record), support_id if isinstance(support_id, str) else "", detail)


def _intact(record: Mapping[str, Any]) -> bool:
    try:
        return event_hash(record) == record.get("hash")
    except (KeyError, TypeError, ValueError, UnicodeError):
        return False


# -- Reading and writing JSON lines (the export and the offline verify) ----------------


def event_line(record: Mapping[str, Any]) -> str:
    """One chained event as a JSON line: the serialised event plus instance, seq, prev_hash, hash."""
    return json.dumps(dict(record), separators=(",", ":"))  # ASCII: lone surrogates survive the file


def mark_line(mark: Mark) -> str:
    """A checkpoint or anchor as a JSON line, told apart from events by its ``record`` key."""
    data = dataclasses.asdict(mark)
    data["kind"] = str(mark.kind)
    return json.dumps({"record": "mark", **data}, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Trail:
    """A trail as read: events per instance in file order, checkpoints, anchors."""

    events: dict[str, list[dict[str, Any]]]
    checkpoints: list[Mark]
    anchors: list[Mark]


def read_lines(lines: Iterable[str], name: str = "<lines>") -> Trail:
    """Parse JSON lines of events and marks; a line that is not one of them is an error naming it."""
    trail = Trail({}, [], [])
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except ValueError:
            raise GatewayError(f"{name}: line {number}: not JSON") from None
        if not isinstance(data, dict):
            raise GatewayError(f"{name}: line {number}: expected a JSON object")
        if data.get("record") == "mark":
            mark = mark_from_dict(data, f"{name}: line {number}")
            (trail.anchors if mark.kind is MarkKind.PRUNE else trail.checkpoints).append(mark)
        else:
            instance = data.get("instance")
            trail.events.setdefault(instance if isinstance(instance, str) else "", []).append(data)
    return trail


def mark_from_dict(data: Mapping[str, Any], where: str) -> Mark:
    """A mark from its JSON line or a table row; an error naming ``where`` when it is not one."""
    try:
        values = {f.name: data[f.name] for f in dataclasses.fields(Mark)}
        mark = Mark(**{**values, "kind": MarkKind(values["kind"])})
    except (KeyError, TypeError, ValueError):
        raise GatewayError(f"{where}: not a checkpoint or prune anchor") from None
    texts = ("instance", "hash", "time", "key_id", "signature")
    if type(mark.seq) is not int or not all(isinstance(getattr(mark, k), str) for k in texts):
        raise GatewayError(f"{where}: not a checkpoint or prune anchor")
    return mark


def trail_lines(events: Iterable[Mapping[str, Any]], marks: Iterable[Mark]) -> Iterator[str]:
    """The JSON lines of an export: marks first (they are few), then the events."""
    for mark in marks:
        yield mark_line(mark)
    for record in events:
        yield event_line(record)


# -- Reading the report ----------------------------------------------------------------


def render_report(report: Report) -> str:
    """The human form: one line per chain, then one per finding, then the verdict."""
    lines = []
    for c in report.chains:
        unsigned = c.last_seq - c.signed_up_to
        tail = f", {unsigned} after the last signed point (chain only)" if unsigned else ""
        lines.append(
            f"{c.instance}: {c.events} events, from {c.start} to seq {c.last_seq}; "
            f"{c.checkpoints} good signatures, signed up to seq {c.signed_up_to}{tail}"
        )
    for f in report.findings:
        where = f"seq {f.seq}" if f.seq is not None else "(no seq)"
        sid = f" (support ID {f.support_id})" if f.support_id else ""
        lines.append(f"{f.instance}: {f.kind} at {where}{sid}: {f.detail}")
    lines.append(
        "OK: every chain and checkpoint verifies" if report.ok else f"FAILED: {len(report.findings)} finding(s)"
    )
    return "\n".join(lines)
