"""Password hashing, the password policy and temporary passwords."""

from __future__ import annotations

import pytest

from gateway.access.passwords import (
    MAX_PASSWORD_LENGTH,
    PolicyRule,
    check_password_policy,
    dummy_verify,
    generate_temporary_password,
    hash_password,
    needs_rehash,
    policy_message,
    verify_password,
)
from gateway.verdict import Reason

GOOD = "correct horse battery"


@pytest.fixture(scope="module")
def stored() -> str:
    return hash_password(GOOD)


def test_hash_is_argon2id_with_per_hash_salt(stored: str) -> None:
    assert stored.startswith("$argon2id$")
    assert GOOD not in stored
    assert hash_password(GOOD) != stored  # a fresh salt every time


def test_verify_accepts_the_right_password(stored: str) -> None:
    assert verify_password(stored, GOOD)


@pytest.mark.parametrize("wrong", ["", "correct horse battery ", "Correct horse battery", "x"])
def test_verify_refuses_a_wrong_password(stored: str, wrong: str) -> None:
    assert not verify_password(stored, wrong)


@pytest.mark.parametrize(
    "bad_hash",
    [
        "",
        "plain-text",
        "$argon2id$garbage",
        "$argon2i$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaA",
        "$2b$12$x",
    ],
)
def test_verify_never_raises_on_a_damaged_hash(bad_hash: str) -> None:
    assert verify_password(bad_hash, GOOD) is False


def test_needs_rehash(stored: str) -> None:
    assert not needs_rehash(stored)
    weak = "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"
    assert needs_rehash(weak)
    assert needs_rehash("not a hash")


def test_dummy_verify_is_always_false() -> None:
    assert dummy_verify(GOOD) is False
    assert dummy_verify("") is False


def test_temporary_passwords_are_long_readable_and_random() -> None:
    seen = {generate_temporary_password() for _ in range(50)}
    assert len(seen) == 50
    for pw in seen:
        assert len(pw) >= 16
        assert not set(pw) & set("0O1lI")
        assert pw.isascii() and pw.isprintable() and " " not in pw


def test_temporary_password_meets_the_default_policy() -> None:
    pw = generate_temporary_password()
    assert check_password_policy("LC000001", "old-password-x", pw, pw, 12).allowed


def test_policy_accepts_a_good_change() -> None:
    verdict = check_password_policy("LC000001", "old password 1", GOOD, GOOD, 12)
    assert verdict.allowed
    assert verdict.reason is Reason.OK


@pytest.mark.parametrize(
    ("user_id", "old", "new", "again", "rule"),
    [
        ("LC000001", "old password 1", GOOD, GOOD + "!", PolicyRule.NEW_PASSWORDS_DIFFER),
        ("LC000001", "old password 1", "short", "short", PolicyRule.TOO_SHORT),
        ("LC000001", "old password 1", "elevenchars", "elevenchars", PolicyRule.TOO_SHORT),
        ("LC000001", GOOD, GOOD, GOOD, PolicyRule.SAME_AS_OLD),
        (
            "LC000001-long",
            "old password 1",
            "LC000001-long",
            "LC000001-long",
            PolicyRule.EQUALS_USER_ID,
        ),
        (
            "LC000001-long",
            "old password 1",
            "lc000001-LONG",
            "lc000001-LONG",
            PolicyRule.EQUALS_USER_ID,
        ),
        (
            "u",
            "o",
            "x" * (MAX_PASSWORD_LENGTH + 1),
            "x" * (MAX_PASSWORD_LENGTH + 1),
            PolicyRule.TOO_LONG,
        ),
    ],
)
def test_policy_refusals(user_id: str, old: str, new: str, again: str, rule: PolicyRule) -> None:
    verdict = check_password_policy(user_id, old, new, again, 12)
    assert not verdict.allowed
    assert verdict.reason is Reason.PASSWORD_POLICY
    assert verdict.detail == rule


def test_policy_exactly_min_length_is_enough() -> None:
    assert check_password_policy("LC000001", "old", "x" * 12, "x" * 12, 12).allowed
    assert not check_password_policy("LC000001", "old", "x" * 11, "x" * 11, 12).allowed


def test_policy_messages_are_clear_and_name_the_length() -> None:
    for rule in PolicyRule:
        message = policy_message(rule, 14)
        assert message.ja and message.en
    too_short = policy_message(PolicyRule.TOO_SHORT, 14)
    assert "14" in too_short.ja and "14" in too_short.en
    fallback = policy_message("something-else", 12)
    assert "policy" in fallback.en
