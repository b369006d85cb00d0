"""The audit chain: its encoding, and every way of tampering named exactly; untouched trails verify clean.

Chains are built with the pure functions and tampered with as lists and as
JSON lines, the way a person with write access to the table or the export
would: update a field, delete, insert, reorder, truncate, replace and
re-sign. Every tamper test has the clean twin beside it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.audit import chain
from gateway.audit.chain import FindingKind, Head, Mark, MarkKind
from gateway.audit.events import FIELDS, AuditEvent, EventKind, event_to_dict, format_time
from gateway.errors import GatewayError

KEY = Ed25519PrivateKey.generate()
OTHER_KEY = Ed25519PrivateKey.generate()
T0 = dt.datetime(2026, 11, 30, 4, 50, 12, 345678, tzinfo=dt.UTC)
Records = list[dict[str, Any]]


def events(count: int, *, start: int = 0, step_ms: int = 1000) -> Records:
    return [
        event_to_dict(
            AuditEvent(
                event=EventKind.LOGIN_REFUSED,
                reason="bad_password",
                time=T0 + dt.timedelta(milliseconds=step_ms * (start + i)),
                support_id=f"SID{start + i:09d}",
                client_ip="10.0.0.7",
                client_port=50000 + i,
                user_id=f"LC{i:06d}",
                user_agent="Mozilla/5.0",
                worker=i % 2 or None,
            )
        )
        for i in range(count)
    ]


def build(count: int, instance: str = "gw1", head: Head | None = None) -> Records:
    return chain.extend(head or Head(instance), events(count))[0]


def mark(records: Records, at: int, kind: MarkKind = MarkKind.CHECKPOINT, key: Ed25519PrivateKey = KEY) -> Mark:
    """A signed mark vouching for the record with seq ``at``."""
    record = next(r for r in records if r["seq"] == at)
    return chain.sign(Mark(kind, record["instance"], at, record["hash"], format_time(T0)), key)


def verify(
    trail: dict[str, Records],
    checkpoints: tuple[Mark, ...] | list[Mark] = (),
    anchors: tuple[Mark, ...] | list[Mark] = (),
    **kw: Any,
) -> chain.Report:
    return chain.verify_chain(trail, checkpoints, anchors, KEY.public_key(), **kw)


def only(report: chain.Report) -> tuple[str, FindingKind, int | None, str]:
    assert len(report.findings) == 1, report.findings
    f = report.findings[0]
    return f.instance, f.kind, f.seq, f.support_id


# -- The encoding ----------------------------------------------------------------------


def test_every_event_field_is_hashed_and_a_new_field_needs_a_new_version() -> None:
    """If this fails, AuditEvent gained a field: add it to a new encoding version, never silently to v1."""
    assert set(chain.BODY_FIELDS) == set(FIELDS) - {"instance"}


def test_the_encoding_is_the_documented_one() -> None:
    record = {**dict.fromkeys(chain.BODY_FIELDS, ""), "instance": "gw1", "seq": 7, "prev_hash": chain.GENESIS}
    record.update(event="login", time="2026-11-30T04:50:12.345Z", client_port=None, worker=3)
    fields = chain.encode_event(record).split(b"\x00")
    assert fields[:4] == [b"gateway-audit-event-v1", b"gw1", b"7", b"0" * 64]
    assert dict(zip(chain.BODY_FIELDS, fields[4:], strict=True)) == {
        **dict.fromkeys(chain.BODY_FIELDS, b""),
        "event": b"login",
        "time": b"2026-11-30T04:50:12.345Z",
        "worker": b"3",
    }


def test_a_known_event_hashes_to_a_known_value() -> None:
    """Pins version 1 byte for byte, rebuilt by hand as another language would: a change breaks every chain."""
    record = build(1)[0]
    by_hand = b"\x00".join(
        [b"gateway-audit-event-v1", b"gw1", b"1", b"0" * 64, b"login_refused", b"bad_password"]
        + [b"2026-11-30T04:50:12.345Z", b"SID000000000", b"10.0.0.7", b"50000"]
        + [b""] * 5  # tls_version, tls_cipher, backend, method, path
        + [b"LC000000"]
        + [b""] * 5  # cert_subject, cert_serial, cert_issuer, cert_fingerprint, cert_not_after
        + [b"Mozilla/5.0", b"", b"", b""]  # user_agent, worker (None), actor, detail
    )
    assert chain.encode_event(record) == by_hand
    assert record["hash"] == hashlib.sha256(by_hand).hexdigest()
    assert record["hash"] == "c865099978f11fbc969aae2f5401cd9809a6dc2c13219117ec0b967e729edf58"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ({"reason": "a\x00b", "detail": ""}, {"reason": "a", "detail": "b"}),  # a separator inside a value
        ({"reason": "a\\0b"}, {"reason": "a\x00b"}),  # an escape sequence typed as text
        ({"reason": "x\\", "detail": "y"}, {"reason": "x", "detail": "\\y"}),
        ({"client_port": None}, {"client_port": 0}),
        ({"reason": "é"}, {"reason": "e\u0301"}),  # no normalisation: the bytes as recorded
    ],
)
def test_no_two_different_events_encode_alike(a: dict[str, Any], b: dict[str, Any]) -> None:
    base = build(1)[0]
    assert chain.encode_event({**base, **a}) != chain.encode_event({**base, **b})


def test_the_writer_side_link_equals_the_verify_side_hash() -> None:
    """``link`` over a body computed outside the lock gives what verify recomputes from the whole record."""
    for record in [*build(3), {**build(1)[0], "reason": "a\x00\\b", "user_agent": "\udcff"}]:
        body = chain.encode_body(record)
        assert chain.link(record["prev_hash"], record["instance"], record["seq"], body) == chain.event_hash(record)


def test_a_batch_linked_under_the_lock_equals_link_even_from_an_odd_head() -> None:
    bodies = [chain.encode_body(e) for e in events(3)]
    for head in (Head("gw1"), Head("g\\w\x001", 41, "not\\hex\x00")):
        links, new_head = chain.link_batch(head, bodies)
        prev = head.hash
        for (seq, prev_hash, digest), body in zip(links, bodies, strict=True):
            assert (prev_hash, digest) == (prev, chain.link(prev, head.instance, seq, body))
            prev = digest
        assert new_head == Head(head.instance, head.seq + 3, prev)


def test_checkpoint_and_anchor_sign_a_head() -> None:
    records, head = chain.extend(Head("gw1"), events(6))
    cp = chain.checkpoint(head, T0, KEY)
    anchor = chain.prune_anchor(Head("gw1", 2, records[1]["hash"]), T0, KEY)
    assert (cp.kind, cp.seq, cp.hash, cp.time) == (MarkKind.CHECKPOINT, 6, head.hash, "2026-11-30T04:50:12.345Z")
    assert chain.signature_problem(cp, KEY.public_key()) == ""
    assert verify({"gw1": records[2:]}, [cp], [anchor]).ok


def test_extend_continues_a_head() -> None:
    first, head = chain.extend(Head("gw1"), events(3))
    more, head2 = chain.extend(head, events(2, start=3))
    assert [r["seq"] for r in first + more] == [1, 2, 3, 4, 5]
    assert more[0]["prev_hash"] == first[-1]["hash"] and head2 == Head("gw1", 5, more[-1]["hash"])
    assert first[0]["prev_hash"] == chain.GENESIS
    assert verify({"gw1": first + more}).ok


# -- Clean trails (the negative controls) ----------------------------------------------


def test_an_untouched_trail_of_several_instances_verifies() -> None:
    trail = {"gw1": build(20, "gw1"), "gw2": build(5, "gw2")}
    report = verify(trail, [mark(trail["gw1"], 10), mark(trail["gw1"], 20), mark(trail["gw2"], 5)])
    assert report.ok, report.findings
    assert [(c.instance, c.events, c.last_seq, c.checkpoints, c.signed_up_to) for c in report.chains] == [
        ("gw1", 20, 20, 2, 20),
        ("gw2", 5, 5, 1, 5),
    ]
    assert "OK" in chain.render_report(report) and json.loads(json.dumps(report.to_dict()))["ok"] is True


def test_a_pruned_head_with_its_anchor_verifies() -> None:
    full = build(30)
    anchor = mark(full, 12, MarkKind.PRUNE)
    report = verify({"gw1": full[12:]}, [mark(full, 30)], [anchor])
    assert report.ok, report.findings
    assert report.chains[0].start.startswith("prune at seq 12")


def test_two_prunes_and_a_fully_pruned_instance_verify() -> None:
    gw1, gw2 = build(30, "gw1"), build(4, "gw2")
    anchors = [mark(gw1, 10, MarkKind.PRUNE), mark(gw1, 20, MarkKind.PRUNE), mark(gw2, 4, MarkKind.PRUNE)]
    report = verify({"gw1": gw1[20:]}, [mark(gw1, 5), mark(gw2, 4)], anchors)
    assert report.ok, report.findings


def test_an_anchor_written_but_the_delete_not_done_verifies() -> None:
    """Prune signs first, deletes second: a crash in between leaves a trail that still verifies."""
    full = build(10)
    assert verify({"gw1": full}, [], [mark(full, 4, MarkKind.PRUNE)]).ok


def test_events_replayed_after_an_outage_verify_in_chain_order_not_time_order() -> None:
    late = events(3, start=0)  # recorded during the outage, chained when replayed
    live = events(3, start=10)
    records, _ = chain.extend(Head("gw1"), live[:1] + late + live[1:])
    assert [r["time"] for r in records] != sorted(r["time"] for r in records)
    assert verify({"gw1": records}, [mark(records, 6)]).ok


def test_a_partial_export_starts_after_a_checkpoint_only_when_asked() -> None:
    full = build(20)
    cp = mark(full, 8)
    assert verify({"gw1": full[8:]}, [cp], partial=True).ok
    assert only(verify({"gw1": full[8:]}, [cp]))[1:3] == (FindingKind.REMOVED, 1)


# -- Tampering, named exactly ---------------------------------------------------------


def test_an_updated_reason_is_modified_at_that_event() -> None:
    records = build(10)
    records[4] = {**records[4], "reason": "ok"}
    assert only(verify({"gw1": records})) == ("gw1", FindingKind.MODIFIED, 5, "SID000000004")


def test_an_updated_and_rehashed_event_is_modified_at_that_event() -> None:
    records = build(10)
    forged = {**records[4], "user_id": "someone_else"}
    records[4] = {**forged, "hash": chain.event_hash(forged)}
    assert only(verify({"gw1": records})) == ("gw1", FindingKind.MODIFIED, 5, "SID000000004")


def test_a_rewritten_tail_is_caught_by_the_checkpoint_it_contradicts() -> None:
    records = build(10)
    cp = mark(records, 10)
    forged_tail, _ = chain.extend(Head("gw1", 4, records[3]["hash"]), [{**r, "reason": "ok"} for r in records[4:]])
    assert only(verify({"gw1": records[:4] + forged_tail}, [cp]))[1:3] == (FindingKind.CHECKPOINT_MISMATCH, 10)


def test_a_deleted_event_is_removed_at_its_seq() -> None:
    records = build(10)
    del records[6]
    report = verify({"gw1": records})
    assert only(report) == ("gw1", FindingKind.REMOVED, 7, "")
    assert "seq 6 is followed by seq 8" in report.findings[0].detail


def test_a_deleted_head_without_an_anchor_is_removed_from_seq_1() -> None:
    records = build(10)
    assert only(verify({"gw1": records[3:]}, [mark(records, 10)]))[1:3] == (FindingKind.REMOVED, 1)


@pytest.mark.parametrize("before", [True, False], ids=["forged-first", "genuine-first"])
def test_a_forged_row_with_an_existing_seq_is_inserted_and_named(before: bool) -> None:
    records = build(10)
    forged = {**records[5], "user_id": "intruder", "support_id": "FORGED"}
    forged["hash"] = chain.event_hash(forged)  # a careful forger: it hashes fine and links back
    records.insert(5 if before else 6, forged)
    assert only(verify({"gw1": records})) == ("gw1", FindingKind.INSERTED, 6, "FORGED")


def test_a_forged_row_appended_without_the_right_link_is_inserted() -> None:
    records = build(10)
    forged = {**records[9], "seq": 11, "prev_hash": "f" * 64, "support_id": "FORGED"}
    forged["hash"] = chain.event_hash(forged)
    assert only(verify({"gw1": [*records, forged]})) == ("gw1", FindingKind.INSERTED, 11, "FORGED")


def test_two_swapped_events_are_reordered() -> None:
    records = build(10)
    records[3], records[4] = records[4], records[3]
    assert only(verify({"gw1": records})) == ("gw1", FindingKind.REORDERED, 4, "SID000000003")


def test_a_tail_truncated_below_a_checkpoint_is_truncated() -> None:
    records = build(20)
    report = verify({"gw1": records[:14]}, [mark(records, 10), mark(records, 18)])
    assert only(report)[1:3] == (FindingKind.TRUNCATED, 15)
    assert "checkpoint at seq 18" in report.findings[0].detail


def test_every_event_of_an_instance_deleted_is_truncated_from_seq_1() -> None:
    gw1, gw2 = build(5, "gw1"), build(5, "gw2")
    assert only(verify({"gw1": gw1}, [mark(gw1, 5), mark(gw2, 3)])) == ("gw2", FindingKind.TRUNCATED, 1, "")


def test_a_replaced_chain_is_caught_by_the_old_checkpoints() -> None:
    real = build(10)
    cp = mark(real, 10)
    fake = chain.extend(Head("gw1"), [{**r, "reason": "ok"} for r in events(10)])[0]
    assert only(verify({"gw1": fake}, [cp]))[1:3] == (FindingKind.CHECKPOINT_MISMATCH, 10)


def test_a_replaced_chain_re_signed_with_another_key_has_bad_signatures() -> None:
    fake = chain.extend(Head("gw1"), [{**r, "reason": "ok"} for r in events(10)])[0]
    report = verify({"gw1": fake}, [mark(fake, 5, key=OTHER_KEY), mark(fake, 10, key=OTHER_KEY)])
    assert [(f.kind, f.seq) for f in report.findings] == [
        (FindingKind.BAD_SIGNATURE, 5),
        (FindingKind.BAD_SIGNATURE, 10),
    ]
    assert "not by the audit key" in report.findings[0].detail
    assert report.chains[0].checkpoints == 0 and not report.ok


@pytest.mark.parametrize(
    "change",
    [
        {"seq": 9},  # moved to vouch for another point
        {"hash": "0" * 64},
        {"time": "2030-01-01T00:00:00.000Z"},
        {"kind": MarkKind.PRUNE},  # a checkpoint's signature passed off as an anchor
    ],
)
def test_an_altered_checkpoint_has_a_bad_signature(change: dict[str, Any]) -> None:
    records = build(10)
    altered = dataclasses.replace(mark(records, 10), **change)
    report = verify({"gw1": records}, [altered] if altered.kind is MarkKind.CHECKPOINT else [], [altered])
    assert report.findings[0].kind is FindingKind.BAD_SIGNATURE
    assert "does not match its content" in report.findings[0].detail


def test_a_head_deleted_behind_a_checkpoint_passed_off_as_an_anchor_is_still_removed() -> None:
    records = build(10)
    as_anchor = dataclasses.replace(mark(records, 4), kind=MarkKind.PRUNE)
    report = verify({"gw1": records[4:]}, [], [as_anchor])
    assert {(f.kind, f.seq) for f in report.findings} == {(FindingKind.BAD_SIGNATURE, 4), (FindingKind.REMOVED, 1)}


def test_only_the_first_bad_event_of_each_instance_is_named() -> None:
    gw1, gw2 = build(10, "gw1"), build(10, "gw2")
    gw1[2] = {**gw1[2], "reason": "x"}
    gw1[7] = {**gw1[7], "reason": "y"}
    del gw2[5]
    report = verify({"gw1": gw1, "gw2": gw2})
    assert [(f.instance, f.kind, f.seq) for f in report.findings] == [
        ("gw1", FindingKind.MODIFIED, 3),
        ("gw2", FindingKind.REMOVED, 6),
    ]
    assert "FAILED: 2 finding(s)" in chain.render_report(report)


@pytest.mark.parametrize("value", [None, "3", 3.0, True, [1]])
def test_a_malformed_seq_is_reported_not_raised(value: object) -> None:
    records = build(5)
    records[2] = {**records[2], "seq": value}
    report = verify({"gw1": records})
    assert not report.ok and report.findings[0].kind in (FindingKind.MODIFIED, FindingKind.REMOVED)


def test_a_missing_or_mistyped_field_is_modified_not_a_crash() -> None:
    records = build(5)
    records[1] = {k: v for k, v in records[1].items() if k != "reason"}
    records[3] = {**records[3], "user_agent": 42}
    assert only(verify({"gw1": records}))[1:3] == (FindingKind.MODIFIED, 2)


# -- JSON lines: the offline path ----------------------------------------------------


def export(tmp_path: Path) -> tuple[Path, list[Mark]]:
    gw1, gw2 = build(12, "gw1"), build(6, "gw2")
    marks = [mark(gw1, 4, MarkKind.PRUNE), mark(gw1, 12), mark(gw2, 6)]
    path = tmp_path / "export.jsonl"
    path.write_text("\n".join(chain.trail_lines(gw1[4:] + gw2, marks)) + "\n", encoding="utf-8")
    return path, marks


def verify_file(path: Path) -> chain.Report:
    trail = chain.read_lines(path.read_text(encoding="utf-8").splitlines(), str(path))
    return chain.verify_chain(trail.events, trail.checkpoints, trail.anchors, KEY.public_key())


def test_an_exported_trail_verifies_offline(tmp_path: Path) -> None:
    path, _ = export(tmp_path)
    report = verify_file(path)
    assert report.ok, report.findings
    assert [c.events for c in report.chains] == [8, 6]


def edit_lines(path: Path, edit: Any) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    edit(lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def set_field(line: str, **changes: Any) -> str:
    return json.dumps({**json.loads(line), **changes})


def test_an_edited_line_is_modified(tmp_path: Path) -> None:
    path, _ = export(tmp_path)
    edit_lines(path, lambda lines: lines.__setitem__(6, set_field(lines[6], reason="ok")))  # 3 marks, then gw1 5..
    assert only(verify_file(path)) == ("gw1", FindingKind.MODIFIED, 8, "SID000000007")


def test_a_deleted_line_is_removed_and_swapped_lines_are_reordered(tmp_path: Path) -> None:
    path, _ = export(tmp_path)
    original = path.read_text(encoding="utf-8")
    edit_lines(path, lambda lines: lines.pop(5))
    assert only(verify_file(path))[1:3] == (FindingKind.REMOVED, 7)
    path.write_text(original, encoding="utf-8")

    def swap(lines: list[str]) -> None:
        lines[12], lines[13] = lines[13], lines[12]

    edit_lines(path, swap)
    assert only(verify_file(path))[:3] == ("gw2", FindingKind.REORDERED, 2)


def test_a_dropped_checkpoint_line_or_anchor_line_is_noticed_or_harmless(tmp_path: Path) -> None:
    path, _ = export(tmp_path)
    original = path.read_text(encoding="utf-8")
    edit_lines(path, lambda lines: lines.pop(0))  # the prune anchor: the head now looks deleted
    assert only(verify_file(path))[1:3] == (FindingKind.REMOVED, 1)
    path.write_text(original, encoding="utf-8")
    edit_lines(path, lambda lines: lines.pop(1))  # a checkpoint: the chain still holds, less is signed
    report = verify_file(path)
    assert report.ok and report.chains[0].signed_up_to == 4


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("{not json", "line 2: not JSON"),
        ("[1, 2]", "line 2: expected a JSON object"),
        ('{"record": "mark"}', "line 2: not a"),
        (
            '{"record":"mark","kind":"checkpoint","instance":"gw1","seq":1,"hash":"","time":"","key_id":1,"signature":""}',
            "line 2: not a",
        ),
        (
            '{"record":"mark","kind":["x"],"instance":"gw1","seq":1,"hash":"","time":"","key_id":"","signature":""}',
            "line 2: not a",
        ),
    ],
)
def test_a_line_that_is_no_record_is_an_error_naming_it(tmp_path: Path, line: str, words: str) -> None:
    path, _ = export(tmp_path)
    edit_lines(path, lambda lines: lines.insert(1, line))
    with pytest.raises(GatewayError, match=words):
        verify_file(path)


def test_a_lone_surrogate_survives_the_file(tmp_path: Path) -> None:
    records = chain.extend(Head("gw1"), [{**events(1)[0], "user_agent": "bad \udcff byte"}])[0]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(chain.trail_lines(records, [mark(records, 1)])), encoding="utf-8")
    assert verify_file(path).ok


# -- The documentation runs ----------------------------------------------------------

DOC = Path(__file__).resolve().parent.parent / "docs" / "audit-integrity.md"


def test_the_documented_field_order_and_known_answer_are_the_code_s() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert ", ".join(chain.BODY_FIELDS) in text
    assert build(1)[0]["hash"] in text


def test_the_documented_recipe_recomputes_every_hash() -> None:
    """The standard-library snippet in docs/audit-integrity.md agrees with the code, escapes included."""
    snippet = DOC.read_text(encoding="utf-8").split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(snippet, namespace)  # our own documentation
    odd = {**events(1)[0], "reason": "a\x00b\\0", "detail": "\\", "user_agent": "\udcff é", "worker": 0}
    for record in chain.extend(Head("gw1"), [*events(3), odd])[0]:
        assert namespace["event_hash"](chain.event_line(record)) == record["hash"]
