"""User records: what a stored record may hold, and how a bearer token is read from a header."""

from __future__ import annotations

import hashlib

import orjson
import pytest

from brickyard_core.credentials import parse_bearer
from gateway_plugins.tenancy.users import InvalidUserError, User, hash_key, key_id_of

DIGEST = hashlib.sha256(b"sk-by-example").hexdigest()


def test_round_trip() -> None:
    user = User("alice@example.com", rpm=10, tpm=None, api_key_hashes=(DIGEST,), created=1.5e9)
    assert User.from_json(user.to_json()) == user
    assert User.from_json(User("b").to_json()) == User("b")
    assert user.key_ids == (DIGEST[:12],)


def test_defaults_and_unknown_fields() -> None:
    assert User.from_json(b'{"name": "a", "added_later": true}') == User("a")
    assert User.from_json('{"name": "a", "rpm": 0, "created": 7}') == User("a", rpm=0, created=7)


def test_keys_are_hashed() -> None:
    assert hash_key("sk-by-example") == DIGEST
    assert key_id_of(DIGEST) == DIGEST[:12]


@pytest.mark.parametrize(
    ("record", "param", "message"),
    [
        (b"not json", None, "not JSON"),
        (b"[]", None, "JSON object"),
        (b"{}", "name", "no name"),
        (b'{"name": ""}', "name", "1-128 characters"),
        (b'{"name": "has space"}', "name", "1-128 characters"),
        (b'{"name": "a/b"}', "name", "1-128 characters"),
        (b'{"name": "a:b"}', "name", "1-128 characters"),
        (b'{"name": "caf\\u00e9"}', "name", "1-128 characters"),
        (b'{"name": "a\\n"}', "name", "1-128 characters"),
        (orjson.dumps({"name": "x" * 129}), "name", "1-128 characters"),
        (b'{"name": 5}', "name", "1-128 characters"),
        (b'{"name": "a", "rpm": -1}', "rpm", "non-negative integer"),
        (b'{"name": "a", "rpm": 1.5}', "rpm", "non-negative integer"),
        (b'{"name": "a", "rpm": "10"}', "rpm", "non-negative integer"),
        (b'{"name": "a", "rpm": true}', "rpm", "non-negative integer"),
        (b'{"name": "a", "tpm": -5}', "tpm", "non-negative integer"),
        (b'{"name": "a", "tpm": [1]}', "tpm", "non-negative integer"),
        (b'{"name": "a", "api_key_hashes": "abc"}', "api_key_hashes", "must be a list"),
        (b'{"name": "a", "api_key_hashes": ["abc"]}', "api_key_hashes", "SHA-256"),
        (orjson.dumps({"name": "a", "api_key_hashes": [DIGEST.upper()]}), "api_key_hashes", "SHA-256"),
        (b'{"name": "a", "api_key_hashes": [1]}', "api_key_hashes", "SHA-256"),
        (b'{"name": "a", "created": "yesterday"}', "created", "unix time"),
        (b'{"name": "a", "created": false}', "created", "unix time"),
    ],
)
def test_bad_records(record: bytes, param: str | None, message: str) -> None:
    with pytest.raises(InvalidUserError, match=message) as raised:
        User.from_json(record)
    assert raised.value.param == param
    assert isinstance(raised.value, ValueError)


def test_longest_name_and_every_allowed_character() -> None:
    assert User.from_json(orjson.dumps({"name": "x" * 128})).name == "x" * 128
    assert User("Az09._@-").name == "Az09._@-"


def test_constructor_validates_too() -> None:
    with pytest.raises(InvalidUserError):
        User("ok", rpm=-1)
    with pytest.raises(InvalidUserError):
        User("ok", api_key_hashes=[DIGEST])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer sk-by-abc", "sk-by-abc"),
        ("bearer sk-by-abc", "sk-by-abc"),
        ("BEARER   sk-by-abc  ", "sk-by-abc"),
        ("  Bearer\tsk-by-abc", "sk-by-abc"),
        (None, None),
        ("", None),
        ("   ", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("Basic dXNlcjpwYXNz", None),
        ("Bearer two tokens", None),
        ("sk-by-abc", None),
        ("Bearersk-by-abc", None),
    ],
)
def test_parse_bearer(header: str | None, token: str | None) -> None:
    assert parse_bearer(header) == token
