"""The audit signing key on disk: created 0600 and never overwritten, refused when others can read it, its public half exported."""

from __future__ import annotations

import stat
from pathlib import Path

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
