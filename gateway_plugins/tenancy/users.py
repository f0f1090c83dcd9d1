"""Users of a multi-tenant gateway: who may call it (API keys) and at what rate.

Redis layout (the one Redis of the deployment):

* ``brickyard:user:<name>``: the user's record, JSON (``User.to_json``).
* ``brickyard:apikey:<sha256 hex>``: the name of the user owning that key: the key index, for point
  lookups by other tools; the gateway builds its own index from the records.
* channel ``brickyard:users``: every change publishes the changed user's name.

Only SHA-256 digests of API keys are stored; a plaintext key exists once, in the answer to
``UserStore.create_key``. API keys are 256-bit random tokens, so a fast unsalted hash is enough: there
is no dictionary to attack, and the gateway pays one SHA-256 per request.

Writers (``UserStore``, behind the admin API) change a record in a WATCH/MULTI/EXEC transaction that
also updates the key index and publishes the name, so concurrent admins never lose each other's change
and every gateway hears of it. Gateways (``UserDirectory``) keep every user in memory and answer each
request from dicts; pub/sub brings changes within milliseconds, and a periodic full reload heals any
message missed while disconnected.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import logging
import math
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError, WatchError

from brickyard_core.credentials import redis_client

log = logging.getLogger(__name__)

USER_KEY_PREFIX = "brickyard:user:"
APIKEY_KEY_PREFIX = "brickyard:apikey:"
USERS_CHANNEL = "brickyard:users"
KEY_PREFIX = "sk-by-"

_NAME = re.compile(r"[A-Za-z0-9._@-]{1,128}")
_DIGEST = re.compile(r"[0-9a-f]{64}")
#: Largest limit: what a signed 64-bit integer holds (orjson and Redis both stop there).
_MAX_LIMIT = 2**63 - 1
_SCAN_BATCH = 500
_BACKOFF_MIN = 0.2
_BACKOFF_MAX = 5.0


def user_key(name: str) -> str:
    return f"{USER_KEY_PREFIX}{name}"


def apikey_key(digest: str) -> str:
    return f"{APIKEY_KEY_PREFIX}{digest}"


def hash_key(api_key: str) -> str:
    """The hex SHA-256 of an API key: what is stored instead of the key."""
    return hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).hexdigest()


def key_id_of(digest: str) -> str:
    """A key's public id: the first 12 hex characters of its digest (shown and revoked by)."""
    return digest[:12]


class InvalidUserError(ValueError):
    """A user field with a bad value; ``param`` names the field (None: the record as a whole)."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


def validate_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidUserError(
            "name", "name must be 1-128 characters of letters, digits, '.', '_', '@' or '-'"
        )
    return name


def validate_limit(param: str, value: object) -> int | None:
    """A rate limit: a non-negative integer, or None for the deployment's default."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_LIMIT:
        raise InvalidUserError(param, f"{param} must be a non-negative integer, or null for the default")
    return value


@dataclass(frozen=True, slots=True)
class User:
    """One tenant. Validated on construction, so no invalid record is ever written or served."""

    name: str
    #: Requests per minute; None: the deployment's default.
    rpm: int | None = None
    #: Tokens per minute; None: the deployment's default.
    tpm: int | None = None
    #: Hex SHA-256 of each API key; plaintext keys are never stored.
    api_key_hashes: tuple[str, ...] = ()
    #: Unix time of creation.
    created: float = 0.0

    def __post_init__(self) -> None:
        validate_name(self.name)
        validate_limit("rpm", self.rpm)
        validate_limit("tpm", self.tpm)
        if not isinstance(self.api_key_hashes, tuple) or not all(
            isinstance(digest, str) and _DIGEST.fullmatch(digest) for digest in self.api_key_hashes
        ):
            raise InvalidUserError("api_key_hashes", "api_key_hashes must be hex SHA-256 digests")
        created = self.created
        if isinstance(created, bool) or not isinstance(created, int | float) or not math.isfinite(created):
            raise InvalidUserError("created", "created must be a unix time")

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(key_id_of(digest) for digest in self.api_key_hashes)

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "name": self.name,
                "rpm": self.rpm,
                "tpm": self.tpm,
                "api_key_hashes": list(self.api_key_hashes),
                "created": self.created,
            }
        )

    @classmethod
    def from_json(cls, data: bytes | str) -> User:
        """Parse a stored record; raises ``InvalidUserError`` (a ValueError) saying what is wrong.

        Unknown fields are ignored, so a record written by a newer release still serves its user.
        """
        try:
            raw = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise InvalidUserError(None, f"user record is not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise InvalidUserError(None, "user record must be a JSON object")
        if "name" not in raw:
            raise InvalidUserError("name", "user record has no name")
        hashes = raw.get("api_key_hashes", [])
        if not isinstance(hashes, list):
            raise InvalidUserError("api_key_hashes", "api_key_hashes must be a list")
        return cls(
            name=raw["name"],
            rpm=raw.get("rpm"),
            tpm=raw.get("tpm"),
            api_key_hashes=tuple(hashes),
            created=raw.get("created", 0.0),
        )


class UserStoreError(Exception):
    """A user-store operation refused because of what is (not) stored."""


class UserExists(UserStoreError):  # noqa: N818 (reads as the condition: except UserExists)
    def __init__(self, name: str) -> None:
        super().__init__(f"user {name!r} already exists")
        self.name = name


class UserNotFound(UserStoreError):  # noqa: N818 (reads as the condition: except UserNotFound)
    def __init__(self, name: str) -> None:
        super().__init__(f"no user named {name!r}")
        self.name = name


class KeyNotFound(UserStoreError):  # noqa: N818 (reads as the condition: except KeyNotFound)
    def __init__(self, name: str, key_id: str) -> None:
        super().__init__(f"user {name!r} has no API key with id {key_id!r}")
        self.name = name
        self.key_id = key_id


class _Unset(enum.Enum):
    UNSET = enum.auto()


#: "Not given" in ``UserStore.update``, where None means "back to the default".
UNSET = _Unset.UNSET


def _connect(redis_url: str) -> aioredis.Redis:
    return redis_client(redis_url, socket_timeout=2, socket_connect_timeout=2)


async def _all_records(redis: aioredis.Redis) -> list[bytes]:
    """Every stored user record (SCAN may repeat keys; each is read once)."""
    keys = sorted({key async for key in redis.scan_iter(match=f"{USER_KEY_PREFIX}*", count=_SCAN_BATCH)})
    records: list[bytes] = []
    for start in range(0, len(keys), _SCAN_BATCH):
        records.extend(data for data in await redis.mget(keys[start : start + _SCAN_BATCH]) if data)
    return records


_T = TypeVar("_T", bound=User | None)


def _existing(name: str, user: User | None) -> User:
    if user is None:
        raise UserNotFound(name)
    return user


class UserStore:
    """The users in Redis, for the admin API. Every mutation is one transaction that publishes the name."""

    def __init__(self, redis_url: str) -> None:
        self.redis = _connect(redis_url)

    async def aclose(self) -> None:
        await self.redis.aclose()

    async def get(self, name: str) -> User:
        data = await self.redis.get(user_key(name))
        if data is None:
            raise UserNotFound(name)
        return User.from_json(data)

    async def list(self) -> list[User]:
        users = [User.from_json(data) for data in await _all_records(self.redis)]
        return sorted(users, key=lambda user: user.name)

    async def create(self, user: User) -> User:
        """Store a new user; ``created`` 0 (unset) is stamped with the current time."""
        if not user.created:
            user = replace(user, created=time.time())

        def create(current: User | None) -> User:
            if current is not None:
                raise UserExists(user.name)
            return user

        return await self._transact(user.name, create)

    async def update(
        self, name: str, *, rpm: int | _Unset | None = UNSET, tpm: int | _Unset | None = UNSET
    ) -> User:
        """Change the limits given; None sets one back to the default, UNSET leaves it as it is."""
        changes = {field: value for field, value in (("rpm", rpm), ("tpm", tpm)) if value is not UNSET}
        return await self._transact(name, lambda current: replace(_existing(name, current), **changes))

    async def delete(self, name: str) -> None:
        """Remove the user and its API keys."""

        def delete(current: User | None) -> None:
            _existing(name, current)

        await self._transact(name, delete)

    async def create_key(self, name: str) -> str:
        """A new API key for the user: returned in plaintext this once, stored only as its digest."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)  # 32 random bytes: 43 URL-safe characters
        digest = hash_key(key)

        def add(current: User | None) -> User:
            user = _existing(name, current)
            return replace(user, api_key_hashes=(*user.api_key_hashes, digest))

        await self._transact(name, add)
        return key

    async def revoke_key(self, name: str, key_id: str) -> None:
        """Revoke the user's API key with id ``key_id`` (see ``key_id_of``)."""

        def revoke(current: User | None) -> User:
            user = _existing(name, current)
            digest = next((d for d in user.api_key_hashes if key_id_of(d) == key_id), None)
            if digest is None:
                raise KeyNotFound(name, key_id)
            return replace(user, api_key_hashes=tuple(d for d in user.api_key_hashes if d != digest))

        await self._transact(name, revoke)

    async def _transact(self, name: str, change: Callable[[User | None], _T]) -> _T:
        """Write ``change(current record)`` (None: delete) with its key-index entries, and publish.

        WATCH makes EXEC fail when another writer changed the record since it was read; the change is
        then redone on the new record. Each retry means another writer committed, so this ends.
        """
        key = user_key(name)
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    data = await pipe.get(key)
                    current = None if data is None else User.from_json(data)
                    new = change(current)
                    old_keys = set(current.api_key_hashes) if current else set()
                    new_keys = set(new.api_key_hashes) if new else set()
                    pipe.multi()
                    if new is None:
                        pipe.delete(key)
                    else:
                        pipe.set(key, new.to_json())
                    for digest in new_keys - old_keys:
                        pipe.set(apikey_key(digest), name)
                    if old_keys - new_keys:
                        pipe.delete(*(apikey_key(digest) for digest in old_keys - new_keys))
                    pipe.publish(USERS_CHANNEL, name)
                    await pipe.execute()
                    return new
                except WatchError:
                    continue


class UserDirectory:
    """The gateway's in-memory mirror of the users, read on every request without a Redis round trip.

    ``run`` keeps it current: a full load at start, the user named by each ``brickyard:users`` message
    reloaded, and a full reload every ``resync_seconds`` for anything missed. With Redis down it serves
    the last view it had, logs the outage once and reconnects with backoff.
    """

    def __init__(self, redis_url: str, *, resync_seconds: float = 30.0) -> None:
        self.redis = _connect(redis_url)
        self.resync_seconds = resync_seconds
        #: True after the first full load: until then no key can be checked.
        self.loaded = False
        self.redis_errors = 0
        self._users: dict[str, User] = {}
        #: API key digest -> (that digest as stored in the record, its user).
        self._keys: dict[str, tuple[str, User]] = {}
        self._down_since: float | None = None
        self._backoff = _BACKOFF_MIN

    @property
    def users_count(self) -> int:
        return len(self._users)

    def get(self, name: str) -> User | None:
        return self._users.get(name)

    def authenticate(self, api_key: str) -> User | None:
        """The user owning ``api_key``, or None.

        Looking the digest up in a dict is safe even though dict lookups are not constant-time: what
        is compared is the digest of the caller's own guess, and timing that reveals how it relates to
        the stored digests is of no use without a SHA-256 preimage. The final comparison is
        constant-time all the same, so the decision never depends on an early exit.
        """
        digest = hash_key(api_key)
        entry = self._keys.get(digest)
        if entry is None:
            return None
        stored, user = entry
        return user if hmac.compare_digest(stored, digest) else None

    async def run(self) -> None:
        """Follow Redis until cancelled, reconnecting with backoff after any failure."""
        try:
            while True:
                try:
                    await self._follow()
                except (RedisError, OSError) as exc:
                    self._failed(exc)
                    await asyncio.sleep(self._backoff)
                    self._backoff = min(self._backoff * 2, _BACKOFF_MAX)
        finally:
            await self.redis.aclose()

    async def _follow(self) -> None:
        async with self.redis.pubsub() as pubsub:
            await pubsub.subscribe(USERS_CHANNEL)
            # Subscribed first: a change made during the load is reloaded from its message afterwards.
            await self._load_all()
            self._recovered()
            next_sync = time.monotonic() + self.resync_seconds
            while True:
                remaining = next_sync - time.monotonic()
                if remaining <= 0:
                    await self._load_all()
                    next_sync = time.monotonic() + self.resync_seconds
                    continue
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=remaining)
                if message is not None:
                    await self._reload(message["data"].decode("utf-8", "replace"))

    async def _load_all(self) -> None:
        """Replace the whole view at once: readers never see half of a reload."""
        users: dict[str, User] = {}
        for data in await _all_records(self.redis):
            try:
                user = User.from_json(data)
            except InvalidUserError as exc:
                log.warning("ignoring a malformed user record: %s", exc)
                continue
            users[user.name] = user
        self._users = users
        self._keys = {digest: (digest, user) for user in users.values() for digest in user.api_key_hashes}
        self.loaded = True

    async def _reload(self, name: str) -> None:
        data = await self.redis.get(user_key(name))
        user: User | None = None
        if data is not None:
            try:
                user = User.from_json(data)
            except InvalidUserError as exc:
                log.warning("ignoring the malformed record of user %r: %s", name, exc)
        old = self._users.pop(name, None)
        if old is not None:
            for digest in old.api_key_hashes:
                entry = self._keys.get(digest)
                if entry is not None and entry[1] is old:
                    del self._keys[digest]
        if user is not None:
            self._users[name] = user
            for digest in user.api_key_hashes:
                self._keys[digest] = (digest, user)

    def _failed(self, exc: BaseException) -> None:
        self.redis_errors += 1
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("Redis unavailable, serving the %d users last loaded: %s", len(self._users), exc)

    def _recovered(self) -> None:
        self._backoff = _BACKOFF_MIN
        if self._down_since is not None:
            log.info("Redis available again after %.1f s", time.monotonic() - self._down_since)
            self._down_since = None
