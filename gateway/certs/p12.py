"""The PKCS#12 files users import: three formats, one per kind of terminal.

Every format holds the user's key, certificate and the CA certificate; key
and certificate bags both carry the user ID as ``friendlyName`` (what the
browser's certificate picker shows) and the same ``localKeyID`` (how Windows,
macOS and NSS pair the key with its certificate).

* ``default``: the manual's download, imported with an **empty password**.
  The key sits in a shrouded key bag encrypted with PBE-SHA1-3DES under the
  empty password, the certificates likewise, with a SHA-1 MAC: the encoding
  Windows itself exports, which every Windows version, NSS, OpenSSL, Java and
  GnuTLS read with an empty password. An unencrypted file (cryptography's
  ``NoEncryption``: a plain key bag and a SHA-256 MAC) is not used: Java's
  keystore lists it as empty (it skips plain key bags) and Windows before
  10 1709 refuses its SHA-256 MAC. The empty password protects nothing; it is
  only the encoding that imports everywhere.
* ``password``: a password the user chooses; AES-256-CBC with PBKDF2-HMAC-
  SHA256 (``PASSWORD_KDF_ROUNDS``) and a SHA-256 MAC. For current Windows
  10/11 and Linux when the file is copied or kept anywhere.
* ``legacy``: "for older Windows": PBE-SHA1-3DES for key and certificates and
  a SHA-1 MAC, with the user's password (required: with an empty one it would
  be ``default``). For Windows before 10 1709 / Server 2016, and for macOS
  Keychain, which refuses files without a password and is reported to fail
  on OpenSSL 3's AES/SHA-256 files.

Passwords of the two password formats: at least ``MIN_PASSWORD_LENGTH``
characters, at most ``MAX_PASSWORD_LENGTH``; the default format takes none.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives._serialization import _KeySerializationEncryption
from cryptography.hazmat.primitives.serialization import PrivateFormat, pkcs12

from gateway.certs.builders import PrivateKey

# The longest file password taken (the portal's form caps its field at the same length).
MAX_PASSWORD_LENGTH = 1024

MIN_PASSWORD_LENGTH = 8
# OWASP's figure for PBKDF2-HMAC-SHA256 (about 0.2 s per file here). The MAC's
# own PKCS#12 KDF stays at cryptography's 2048 rounds (not configurable).
PASSWORD_KDF_ROUNDS = 600_000
# What Windows before 10 1709 can check; the MAC guards integrity, not secrecy.
_LEGACY_MAC = hashes.SHA1()  # noqa: S303


class P12Format(StrEnum):
    DEFAULT = "default"
    PASSWORD = "password"  # noqa: S105 (a format's name, not a secret)
    LEGACY = "legacy"


def password_problem(fmt: P12Format, password: str) -> tuple[str, str] | None:
    """Why ``password`` does not fit ``fmt``, in Japanese and English; None when it fits."""
    if fmt is P12Format.DEFAULT:
        if password:
            return (
                "標準の形式はパスワードなしです。パスワードを付ける場合は「パスワード付き」を選んでください。",
                'the default format has no password; choose "with a password" to set one',
            )
        return None
    if not password:
        return (
            "この形式にはパスワードが必要です。ファイルのパスワードを入力してください。",
            "this format needs a password: enter a file password",
        )
    if len(password) < MIN_PASSWORD_LENGTH:
        return (
            f"ファイルのパスワードは {MIN_PASSWORD_LENGTH} 文字以上にしてください。",
            f"the file password must have at least {MIN_PASSWORD_LENGTH} characters",
        )
    if len(password) > MAX_PASSWORD_LENGTH:
        return (
            f"ファイルのパスワードは {MAX_PASSWORD_LENGTH} 文字以内にしてください。",
            f"the file password must have at most {MAX_PASSWORD_LENGTH} characters",
        )
    return None


def _encryption(fmt: P12Format, password: str) -> serialization.KeySerializationEncryption:
    builder = PrivateFormat.PKCS12.encryption_builder()
    if fmt is P12Format.PASSWORD:
        builder = builder.kdf_rounds(PASSWORD_KDF_ROUNDS)
        builder = builder.key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC).hmac_hash(hashes.SHA256())
        return builder.build(password.encode("utf-8"))
    legacy = builder.key_cert_algorithm(pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC).hmac_hash(_LEGACY_MAC)
    if fmt is P12Format.LEGACY:
        return legacy.build(password.encode("utf-8"))
    # The public builder refuses an empty password; the serializer itself
    # handles it (OpenSSL's encoding of "": a BMPString of just the NUL), so
    # the empty-password file is made with the builder's own settings.
    return _KeySerializationEncryption(
        PrivateFormat.PKCS12,
        b"",
        kdf_rounds=None,
        hmac_hash=_LEGACY_MAC,
        key_cert_algorithm=pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC,
    )


def bundle(
    key: PrivateKey,
    cert: x509.Certificate,
    ca_certs: Sequence[x509.Certificate],
    *,
    friendly_name: str,
    fmt: P12Format = P12Format.DEFAULT,
    password: str = "",
) -> bytes:
    """The PKCS#12 file of ``fmt``; ValueError when the password does not fit the format."""
    problem = password_problem(fmt, password)
    if problem is not None:
        raise ValueError(problem[1])
    encryption = _encryption(fmt, password)
    return pkcs12.serialize_key_and_certificates(friendly_name.encode("utf-8"), key, cert, list(ca_certs), encryption)
