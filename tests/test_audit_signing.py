"""The audit signing key on disk: created 0600 and never overwritten, refused when others can read it, its public half exported."""

from __future__ import annotations

import multiprocessing
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.audit import chain
from gateway.audit.chain import Mark, MarkKind
from gateway.audit.signing import (
    export_public_key,
    generate_signing_key,
    load_or_create_signing_key,
    load_public_key,
    load_signing_key,
)
from gateway.certs.files import write_private_key
from gateway.errors import PkiError


def test_a_new_key_is_owner_only_and_loads_back(tmp_path: Path) -> None:
    path = tmp_path / "state" / "audit-signing.key"
    key = generate_signing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert chain.key_id(load_signing_key(path).public_key()) == chain.key_id(key.public_key())


def test_an_existing_key_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "audit-signing.key"
    generate_signing_key(path)
    before = path.read_bytes()
    with pytest.raises(PkiError, match="exists already; refusing to overwrite"):
        generate_signing_key(path)
    assert path.read_bytes() == before
    assert load_or_create_signing_key(path).private_bytes_raw() == load_signing_key(path).private_bytes_raw()


def test_the_loser_of_a_creation_race_uses_the_winners_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process creates the key between our look and our link: ours is dropped, theirs is used."""
    path = tmp_path / "audit-signing.key"
    real_link = os.link
    theirs: list[bytes] = []

    def someone_else_first(src: str | Path, dst: str | Path) -> None:
        monkeypatch.setattr(os, "link", real_link)
        theirs.append(generate_signing_key(path).private_bytes_raw())
        real_link(src, dst)

    monkeypatch.setattr(os, "link", someone_else_first)
    key = load_or_create_signing_key(path)
    assert key.private_bytes_raw() == theirs[0] == load_signing_key(path).private_bytes_raw()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit-signing.key"]  # no temporary file left


def _load_or_create_together(path: Path, barrier: Any, out: Any) -> None:
    barrier.wait()
    try:
        out.put(load_or_create_signing_key(path).private_bytes_raw())
    except PkiError as exc:
        out.put(str(exc))


def test_processes_starting_together_all_get_the_one_key(tmp_path: Path) -> None:
    """A gateway and the portal (or instances sharing the file) starting at once: one key, nobody fails."""
    path = tmp_path / "audit-signing.key"
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_load_or_create_together, args=(path, barrier, out)) for _ in range(6)]
    for proc in procs:
        proc.start()
    keys = [out.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    out.close()
    out.join_thread()
    assert keys == [load_signing_key(path).private_bytes_raw()] * 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit-signing.key"]


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620])
def test_a_key_open_to_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "audit-signing.key"
    generate_signing_key(path)
    path.chmod(mode)
    with pytest.raises(PkiError, match=rf"open to group/others \(mode {mode:04o}\): chmod 600"):
        load_signing_key(path)


def test_a_key_of_another_type_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ec.key"
    write_private_key(path, ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(PkiError, match="must be Ed25519"):
        load_signing_key(path)
    with pytest.raises(PkiError, match="cannot read"):
        load_signing_key(tmp_path / "missing.key")


def test_the_exported_public_key_verifies_what_the_key_signed(tmp_path: Path) -> None:
    key = load_or_create_signing_key(tmp_path / "audit-signing.key")
    export_public_key(key, tmp_path / "audit.pub")
    assert (tmp_path / "audit.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    signed = chain.sign(Mark(MarkKind.CHECKPOINT, "gw1", 3, "a" * 64, "2026-11-30T04:50:12.345Z"), key)
    for public in (load_public_key(tmp_path / "audit.pub"), load_public_key(tmp_path / "audit-signing.key")):
        assert chain.signature_problem(signed, public) == ""
    other = tmp_path / "other"
    export_public_key(generate_signing_key(other / "k"), other / "audit.pub")
    assert "not by the audit key" in chain.signature_problem(signed, load_public_key(other / "audit.pub"))


def test_a_public_key_file_that_is_not_one_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.pub").write_text("hello\n", encoding="utf-8")
    with pytest.raises(PkiError, match="not a PEM public key"):
        load_public_key(tmp_path / "x.pub")
