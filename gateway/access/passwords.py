"""Password hashing (argon2id), the password policy and temporary passwords.

Hashes are argon2id strings in PHC format (``$argon2id$v=19$m=...``): the
salt is random per hash and stored inside the string, so the user store keeps
one column per user and parameter upgrades are visible to :func:`needs_rehash`.

Async usage: :func:`hash_password` and :func:`verify_password` each cost tens
of milliseconds of CPU and memory on purpose. From aiohttp handlers call them
through ``await loop.run_in_executor(None, verify_password, stored, given)``;
argon2 releases the GIL, so a thread pool really runs them in parallel.
For an unknown or disabled user call :func:`dummy_verify` the same way, so the
answer time does not tell whether the user ID exists.

:func:`check_password_policy` is a pure decision (no KDF, no I/O); it returns
a :class:`~gateway.verdict.Verdict` whose ``detail`` is a :class:`PolicyRule`
code, and :func:`policy_message` turns that code into the sentence shown to
the user (Japanese first, English second).
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from enum import StrEnum
from functools import cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from gateway.verdict import Reason, Verdict

# argon2-cffi's defaults are RFC 9106's "low memory" profile (argon2id, t=3,
# m=64 MiB, p=4): about 50-100 ms per hash on a server core.
_HASHER = PasswordHasher()
HASH_PREFIX = "$argon2id$"

# A password longer than this is refused by the policy: argon2 would accept
# it, but nobody types 1 KiB and the form handler should not hash megabytes.
MAX_PASSWORD_LENGTH = 1024

# Temporary passwords avoid look-alike characters (0/O, 1/l/I) because an
# operator reads them out over the phone to the user.
_TEMP_ALPHABET = "abcdefghijkmnpqrstuvwxyzACDEFGHJKLMNPQRSTUVWXYZ23456789"
_TEMP_GROUPS = 4
_TEMP_GROUP_LENGTH = 5


def hash_password(password: str) -> str:
    """Return an argon2id hash of ``password`` with a fresh random salt."""
    return _HASHER.hash(password)


def verify_password(stored_hash: str, password: str) -> bool:
    """True when ``password`` matches ``stored_hash``.

    Never raises for a wrong password or a damaged/unknown hash string: the
    login only needs yes or no, and a corrupt row must not become a 500.
    The comparison inside argon2 is constant-time.
    """
    if not stored_hash.startswith(HASH_PREFIX):
        return False
    try:
        return _HASHER.verify(stored_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(stored_hash: str) -> bool:
    """True when the hash was made with weaker parameters than today's.

    Call after a successful login and store a new hash of the password the
    user just typed. An unreadable hash also answers True.
    """
    try:
        return _HASHER.check_needs_rehash(stored_hash)
    except (InvalidHashError, ValueError):
        return True


@cache
def _dummy_hash() -> str:
    # Computed once per process, with the same parameters as real hashes so a
    # verify against it costs the same time.
    return hash_password(secrets.token_urlsafe(24))


def dummy_verify(password: str) -> bool:
    """Spend the time of one real verification and return False.

    For unknown and disabled users, so "no such user" and "wrong password"
    take equally long.
    """
    verify_password(_dummy_hash(), password)
    return False


def generate_temporary_password() -> str:
    """A random, readable temporary password such as ``k7Hq2-xRt9m-...``.

    Four groups of five characters from a 55-letter alphabet: 20 random
    characters, about 115 bits, 23 characters long with the dashes.
    """
    groups = ("".join(secrets.choice(_TEMP_ALPHABET) for _ in range(_TEMP_GROUP_LENGTH)) for _ in range(_TEMP_GROUPS))
    return "-".join(groups)


class PolicyRule(StrEnum):
    """Which rule of the password policy a new password broke (Verdict.detail)."""

    NEW_PASSWORDS_DIFFER = "new_passwords_differ"
    TOO_SHORT = "too_short"
    TOO_LONG = "too_long"
    SAME_AS_OLD = "same_as_old"
    EQUALS_USER_ID = "equals_user_id"


@dataclass(frozen=True, slots=True)
class PolicyMessage:
    """The sentence shown on the password-change page."""

    ja: str
    en: str


def check_password_policy(user_id: str, old: str, new: str, again: str, min_length: int) -> Verdict:
    """Decide whether ``new`` may become the user's password (pure).

    Checks, in order: (1) the two new entries are equal; (2) at least
    ``min_length`` characters; (3) not absurdly long; (4) differs from the
    old password; (5) differs from the user ID (ignoring case, since the ID
    is printed on the certificate and in every screen). Whether ``old`` is the
    current password is checked by the caller with :func:`verify_password`.
    Secret comparisons use :func:`hmac.compare_digest`.
    """
    if not _same_secret(new, again):
        return Verdict.deny(Reason.PASSWORD_POLICY, PolicyRule.NEW_PASSWORDS_DIFFER)
    if len(new) < min_length:
        return Verdict.deny(Reason.PASSWORD_POLICY, PolicyRule.TOO_SHORT)
    if len(new) > MAX_PASSWORD_LENGTH:
        return Verdict.deny(Reason.PASSWORD_POLICY, PolicyRule.TOO_LONG)
    if _same_secret(new, old):
        return Verdict.deny(Reason.PASSWORD_POLICY, PolicyRule.SAME_AS_OLD)
    if new.casefold() == user_id.casefold():
        return Verdict.deny(Reason.PASSWORD_POLICY, PolicyRule.EQUALS_USER_ID)
    return Verdict.allow("password policy met")


def policy_message(rule: str, min_length: int) -> PolicyMessage:
    """The user-facing sentence for a :class:`PolicyRule` code."""
    messages = {
        PolicyRule.NEW_PASSWORDS_DIFFER: PolicyMessage(
            "新しいパスワードが確認用の入力と一致しません。",
            "The new password and its confirmation do not match.",
        ),
        PolicyRule.TOO_SHORT: PolicyMessage(
            f"新しいパスワードは{min_length}文字以上にしてください。",
            f"The new password must be at least {min_length} characters long.",
        ),
        PolicyRule.TOO_LONG: PolicyMessage(
            f"新しいパスワードは{MAX_PASSWORD_LENGTH}文字以内にしてください。",
            f"The new password must be at most {MAX_PASSWORD_LENGTH} characters long.",
        ),
        PolicyRule.SAME_AS_OLD: PolicyMessage(
            "新しいパスワードには現在のパスワードと異なるものを指定してください。",
            "The new password must differ from the current one.",
        ),
        PolicyRule.EQUALS_USER_ID: PolicyMessage(
            "ユーザIDと同じパスワードは使用できません。",
            "The password must not be the same as the user ID.",
        ),
    }
    try:
        return messages[PolicyRule(rule)]
    except ValueError:
        return PolicyMessage(
            "新しいパスワードがパスワードポリシーを満たしていません。",
            "The new password does not meet the password policy.",
        )


def _same_secret(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))
