"""The audit signing key on disk: generate it (0600), load it (refused when others can read it), export its public half.

The key signs checkpoints and prune anchors (:mod:`gateway.audit.chain`).
Whoever holds it can vouch for a rewritten trail, so it gets the same care
as the TLS and CA keys: written owner-only, and a key file that group or
others can read is refused rather than used, as ``check-config`` refuses
the other private files. The public key (PEM) goes to the security team,
who verify exports offline with it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.certs.files import write_atomic
from gateway.errors import PkiError


class SigningKeyExists(PkiError):
    """:func:`generate_signing_key` found a key at the path already (made by someone else meanwhile)."""


def generate_signing_key(path: Path) -> Ed25519PrivateKey:
    """Create a new key at ``path`` (0600); an existing file is never overwritten (its checkpoints need it).

    The key is written whole to a private temporary file first and then linked
    into place, which fails if ``path`` exists: a process reading ``path`` never
    sees half a key, and of two processes creating it at once exactly one wins.
    """
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        raise SigningKeyExists(f"{path}: an audit signing key exists already; refusing to overwrite it")
    making = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
    try:
        fd = os.open(making, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(making, path)
    except FileExistsError:
        raise SigningKeyExists(f"{path}: an audit signing key exists already; refusing to overwrite it") from None
    except OSError as exc:
        raise PkiError(f"{path}: cannot create the audit signing key: {exc.strerror}") from exc
    finally:
        making.unlink(missing_ok=True)
    return key


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """Read the key, refusing a file group or others may read or write (like the other private keys)."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        data = path.read_bytes()
    except OSError as exc:
        raise PkiError(f"{path}: cannot read the audit signing key: {exc.strerror}") from exc
    if mode & 0o077:
        raise PkiError(f"{path}: audit signing key is open to group/others (mode {mode:04o}): chmod 600 {path}")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{path}: not an unencrypted PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise PkiError(f"{path}: the audit signing key must be Ed25519")
    return key


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """The key at ``path``, created on first use (what a gateway's first start does).

    Processes sharing the path (a gateway and the portal on one host, instances
    sharing the file) may start together and all find it missing: one creates
    it and the others use that one.
    """
    if path.exists():
        return load_signing_key(path)
    try:
        return generate_signing_key(path)
    except SigningKeyExists:
        return load_signing_key(path)


def public_key_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The public key as PEM (SubjectPublicKeyInfo), what ``openssl pkey -pubin`` reads."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def export_public_key(key: Ed25519PrivateKey, path: Path) -> None:
    """Write the public key for the security team (0644: it is public)."""
    write_atomic(path, public_key_pem(key), mode=0o644)


def load_public_key(path: Path) -> Ed25519PublicKey:
    """A PEM public key, or the public half of a PEM private key (the gateway's own key file)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PkiError(f"{path}: cannot read the audit public key: {exc.strerror}") from exc
    if b"PRIVATE KEY" in data:
        return load_signing_key(path).public_key()
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{path}: not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise PkiError(f"{path}: the audit public key must be Ed25519")
    return key
