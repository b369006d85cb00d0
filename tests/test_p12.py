"""The three PKCS#12 download formats, read back by four independent readers.

Each format is written by :func:`gateway.certs.p12.bundle` and opened by OpenSSL
(``openssl pkcs12``), NSS (``pk12util``, the store Chrome and Firefox use on
Linux), Java (``keytool``) and GnuTLS (``certtool``), with the password the
user would type (empty for the default). Each reader must find the user ID as
the friendly name and a key that belongs to the certificate; each refuses a
wrong password. A missing reader fails the test (``./dev.sh setup`` installs
them all) with the Debian package to install.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import load_pem_private_key, pkcs12

from gateway.certs import builders as pki
from gateway.certs import p12
from gateway.certs.p12 import P12Format

USER = "LC000001"
PASSWORD = "correct horse 7"
NOW = dt.datetime(2026, 4, 1, tzinfo=dt.UTC)
SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class Issued:
    """One PKCS#12 file on disk, what it should hold and the password it opens with."""

    path: Path
    fmt: P12Format
    password: str
    cert: x509.Certificate
    ca: x509.Certificate


FORMATS: dict[P12Format, str] = {P12Format.DEFAULT: "", P12Format.PASSWORD: PASSWORD, P12Format.LEGACY: PASSWORD}


def tool(name: str, package: str) -> str:
    """The reader's path; a missing reader fails (never skips) naming its Debian package."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install the Debian package {package} (./dev.sh setup does)")
    return path


def run(args: Sequence[str], *, ok: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(args), capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)
    if ok:
        assert done.returncode == 0, f"{args[0]} failed: {done.stdout}{done.stderr}"
    return done


def spki(key_or_cert: pki.PrivateKey | x509.Certificate) -> bytes:
    public = key_or_cert.public_key()
    return public.public_bytes(*SPKI)


@pytest.fixture(scope="module")
def ca() -> tuple[pki.PrivateKey, x509.Certificate]:
    key = pki.generate_key()
    return key, pki.build_ca(key, now=NOW)


@pytest.fixture(params=list(P12Format), ids=str)
def issued(request: pytest.FixtureRequest, ca: tuple[pki.PrivateKey, x509.Certificate], tmp_path: Path) -> Issued:
    ca_key, ca_cert = ca
    fmt: P12Format = request.param
    key = pki.generate_key()
    cert = pki.build_client_cert(ca_cert, ca_key, key.public_key(), USER, not_before=NOW)
    path = tmp_path / f"{USER}-{fmt}.p12"
    password = FORMATS[fmt]
    path.write_bytes(p12.bundle(key, cert, [ca_cert], friendly_name=USER, fmt=fmt, password=password))
    return Issued(path, fmt, password, cert, ca_cert)


# -- the encodings --------------------------------------------------------------


def test_openssl_sees_the_format_the_friendly_name_and_the_matching_key(issued: Issued) -> None:
    """Encryption and MAC per format; friendlyName and localKeyID on key and certificate bags."""
    openssl = tool("openssl", "openssl")
    passin = ["-passin", f"pass:{issued.password}"]
    info = run([openssl, "pkcs12", "-info", "-nokeys", "-in", str(issued.path), *passin])
    text = info.stdout + info.stderr
    if issued.fmt is P12Format.PASSWORD:
        assert "MAC: sha256" in text
        assert "PBES2, PBKDF2, AES-256-CBC, Iteration 600000, PRF hmacWithSHA256" in text
        assert "pbeWithSHA1And3-KeyTripleDES-CBC" not in text
    else:  # the default (empty password) and legacy: what Windows before 10 1709 reads
        assert "MAC: sha1" in text
        assert "PKCS7 Encrypted data: pbeWithSHA1And3-KeyTripleDES-CBC" in text
        assert "Shrouded Keybag: pbeWithSHA1And3-KeyTripleDES-CBC" in text
        assert "AES" not in text and "sha256" not in text.split("MAC length")[0]
    # OpenSSL 3 needs -legacy only for RC2/RC4; none of the formats uses them.
    full = run([openssl, "pkcs12", "-info", "-nodes", "-in", str(issued.path), *passin]).stdout
    assert full.count(f"friendlyName: {USER}") == 2  # key bag and the user's certificate bag
    key_ids = re.findall(r"localKeyID: ([0-9A-F ]+)", full)
    assert len(key_ids) == 2 and key_ids[0] == key_ids[1]
    keys = run([openssl, "pkcs12", "-nocerts", "-nodes", "-in", str(issued.path), *passin]).stdout
    key = load_pem_private_key(keys[keys.index("-----BEGIN") :].encode(), None)
    assert isinstance(key, pki.PrivateKey)
    assert spki(key) == spki(issued.cert)
    assert "BEGIN CERTIFICATE" in full and "issuer=C = JP, O = Tokyo Stock Exchange" in full  # the CA is inside


def test_nss_lists_and_imports_the_key_paired_with_the_certificate(issued: Issued, tmp_path: Path) -> None:
    """NSS (Chrome/Firefox on Linux) lists the file and pairs key and certificate on import."""
    pk12util = tool("pk12util", "libnss3-tools")
    certutil = tool("certutil", "libnss3-tools")
    listing = run([pk12util, "-l", str(issued.path), "-W", issued.password]).stdout
    assert "Certificate(has private key):" in listing
    assert f"Friendly Name: {USER}" in listing
    db = tmp_path / "nssdb"
    db.mkdir()
    run([certutil, "-N", "-d", f"sql:{db}", "--empty-password"])
    run([pk12util, "-i", str(issued.path), "-d", f"sql:{db}", "-W", issued.password, "-K", ""])
    keys = run([certutil, "-K", "-d", f"sql:{db}"]).stdout
    assert re.search(rf"^<\s*0> ec\s+[0-9a-f]+\s+{USER}$", keys, re.MULTILINE), keys  # the key has the certificate
    certs = run([certutil, "-L", "-d", f"sql:{db}"]).stdout
    assert re.search(rf"^{USER}\s+u,u,u$", certs, re.MULTILINE), certs  # "u": a user certificate with its key
    pem = run([certutil, "-L", "-d", f"sql:{db}", "-n", USER, "-a"]).stdout
    assert x509.load_pem_x509_certificate(pem.encode()) == issued.cert


def test_java_keytool_lists_the_entry_and_copies_the_key(issued: Issued, tmp_path: Path) -> None:
    """Java's keystore: one PrivateKeyEntry under the user ID with a chain to the CA.

    keytool lowercases PKCS#12 aliases. An empty store password works with
    ``-storepass ''`` on these files; on an unencrypted file (a plain key bag)
    Java lists no entry at all, which is why the default is not unencrypted.
    The copy through ``-importkeystore`` makes Java decrypt the key; reading
    the copy back shows the key it decrypted belongs to the certificate.
    """
    keytool = tool("keytool", "openjdk-17-jre-headless")
    listing = run(
        [keytool, "-list", "-v", "-storetype", "PKCS12", "-keystore", str(issued.path), "-storepass", issued.password]
    ).stdout
    assert "Your keystore contains 1 entry" in listing
    assert f"Alias name: {USER.lower()}" in listing
    assert "Entry type: PrivateKeyEntry" in listing
    assert "Certificate chain length: 2" in listing
    assert f"Owner: CN={USER}" in listing and "Owner: CN=Tokyo Stock Exchange SSO CA" in listing
    copy = tmp_path / "java-copy.p12"
    run(
        [
            keytool,
            "-importkeystore",
            "-noprompt",
            "-srckeystore",
            str(issued.path),
            "-srcstoretype",
            "PKCS12",
            "-srcstorepass",
            issued.password,
            "-destkeystore",
            str(copy),
            "-deststoretype",
            "PKCS12",
            "-deststorepass",
            "java-copy-pass",
        ]
    )
    key, cert, _ = pkcs12.load_key_and_certificates(copy.read_bytes(), b"java-copy-pass")
    assert key is not None and cert == issued.cert
    assert spki(key) == spki(issued.cert)  # type: ignore[arg-type]


def test_gnutls_reads_the_bags_and_decrypts_the_matching_key(issued: Issued, tmp_path: Path) -> None:
    """GnuTLS: MAC and bags verified, friendly name on both, the key decrypted and matching."""
    certtool = tool("certtool", "gnutls-bin")
    # certtool's --password '' is not the empty PKCS#12 password; --empty-password is.
    password = ["--password", issued.password] if issued.password else ["--empty-password"]
    info = run([certtool, "--p12-info", "--inder", *password, "--infile", str(issued.path)])
    text = info.stdout + info.stderr
    assert "MAC: SHA256" in text if issued.fmt is P12Format.PASSWORD else "MAC: SHA1" in text
    assert text.count(f"Friendly name: {USER}") == 2
    encrypted = re.search(r"-----BEGIN ENCRYPTED PRIVATE KEY-----.*?-----END ENCRYPTED PRIVATE KEY-----", text, re.S)
    assert encrypted is not None, text
    enc_file = tmp_path / "key.enc.pem"
    enc_file.write_text(encrypted.group(0) + "\n")
    key_info = run([certtool, "--key-info", *password, "--infile", str(enc_file)]).stdout
    # GnuTLS derives the public key from the key it decrypted: its pin is SHA-256 over that SPKI.
    pin = base64.b64encode(hashlib.sha256(spki(issued.cert)).digest()).decode()
    assert f"pin-sha256:{pin}" in key_info, key_info


# -- wrong passwords are refused by every reader -----------------------------------


def test_every_reader_refuses_a_wrong_password(issued: Issued) -> None:
    wrong = "not the password"
    openssl = tool("openssl", "openssl")
    path = str(issued.path)
    assert run([openssl, "pkcs12", "-info", "-nokeys", "-in", path, "-passin", f"pass:{wrong}"], ok=False).returncode
    assert run([tool("pk12util", "libnss3-tools"), "-l", path, "-W", wrong], ok=False).returncode
    keytool = tool("keytool", "openjdk-17-jre-headless")
    assert run([keytool, "-list", "-storetype", "PKCS12", "-keystore", path, "-storepass", wrong], ok=False).returncode
    certtool = tool("certtool", "gnutls-bin")
    assert run([certtool, "--p12-info", "--inder", "--password", wrong, "--infile", path], ok=False).returncode


# -- which passwords each format takes --------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "password", "why"),
    [
        (P12Format.DEFAULT, PASSWORD, "default format has no password"),
        (P12Format.PASSWORD, "", "needs a password"),
        (P12Format.LEGACY, "", "needs a password"),
        (P12Format.PASSWORD, "x" * (p12.MIN_PASSWORD_LENGTH - 1), "at least 8 characters"),
        (P12Format.LEGACY, "x" * (p12.MIN_PASSWORD_LENGTH - 1), "at least 8 characters"),
        (P12Format.PASSWORD, "x" * 1025, "at most 1024 characters"),
    ],
)
def test_a_password_that_does_not_fit_the_format_is_refused(
    ca: tuple[pki.PrivateKey, x509.Certificate], fmt: P12Format, password: str, why: str
) -> None:
    ca_key, ca_cert = ca
    key = pki.generate_key()
    cert = pki.build_client_cert(ca_cert, ca_key, key.public_key(), USER, not_before=NOW)
    problem = p12.password_problem(fmt, password)
    assert problem is not None and why in problem[1] and problem[0]  # both languages
    with pytest.raises(ValueError, match=why):
        p12.bundle(key, cert, [ca_cert], friendly_name=USER, fmt=fmt, password=password)


@pytest.mark.parametrize(
    ("fmt", "password"),
    [
        (P12Format.DEFAULT, ""),
        (P12Format.PASSWORD, "x" * p12.MIN_PASSWORD_LENGTH),
        (P12Format.LEGACY, "x" * p12.MIN_PASSWORD_LENGTH),
        (P12Format.PASSWORD, "x" * 1024),
    ],
)
def test_a_password_that_fits_is_accepted(fmt: P12Format, password: str) -> None:
    assert p12.password_problem(fmt, password) is None
