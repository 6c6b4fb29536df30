"""Env keys must be safe, portable file names."""

from __future__ import annotations

import pytest

from provisioner.errors import InvalidKeyError, UserError
from provisioner.keys import MAX_KEY_LENGTH, validate_env_key


@pytest.mark.parametrize(
    "key",
    [
        "torch-cu121-transformers-bnb",
        "a",
        "a.b_c-1",
        "_private",
        "0",
        "x" * MAX_KEY_LENGTH,
        "console",
        "com10",
        "nul-ish",
    ],
)
def test_accepts(key: str) -> None:
    assert validate_env_key(key) == key


@pytest.mark.parametrize(
    "key",
    [
        "../x",
        "..",
        ".",
        "a/b",
        "a\\b",
        "C:x",
        "c:x",
        "CON",
        "con",
        "nul.txt",
        "com1",
        "lpt9",
        "aux.tar.gz",
        "",
        None,
        "a\0b",
        "a\nb",
        "a\n",
        "\n",
        "x" * (MAX_KEY_LENGTH + 1),
        ".hidden",
        "-flag",
        "Torch",
        "TORCH-CU121",
        "key.",
        "a b",
        "a\tb",
        "ä",
        "a*",
        3,
        b"key",
        ["key"],
    ],
)
def test_rejects_with_one_line_message(key: object) -> None:
    with pytest.raises(InvalidKeyError) as info:
        validate_env_key(key)
    message = str(info.value)
    assert message
    assert "\n" not in message and "\r" not in message and "\0" not in message
    assert info.value.hint is None or "\n" not in info.value.hint
    assert isinstance(info.value, UserError)


def test_hint_for_bad_characters() -> None:
    with pytest.raises(InvalidKeyError) as info:
        validate_env_key("Bad/Key")
    assert info.value.hint is not None and "lower-case" in info.value.hint


def test_reserved_name_message() -> None:
    with pytest.raises(InvalidKeyError, match="reserved device name on Windows"):
        validate_env_key("nul.txt")


def test_trailing_dot_message() -> None:
    with pytest.raises(InvalidKeyError, match="ends with a dot"):
        validate_env_key("key.")


def test_too_long_message() -> None:
    with pytest.raises(InvalidKeyError, match="longer than 64 characters"):
        validate_env_key("x" * 65)
