"""Secrets every component handles the same way: where they come from, how a bearer token is checked, and
the Redis password.

Secrets never live in settings files (those are ConfigMaps): each is read from a file (a mounted Secret)
or from an environment variable (``secretKeyRef``).
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

#: The Redis password of every component, used when a ``redis_url`` carries none.
REDIS_PASSWORD_ENV = "BRICKYARD_REDIS_PASSWORD"
#: The runtime sidecars' adapter API token: the sidecars check it, the controllers send it.
SIDECAR_TOKEN_ENV = "BRICKYARD_SIDECAR_TOKEN"


def read_secret(path: str | None, env: str) -> str | None:
    """The secret in the file ``path`` if given, else in the environment variable ``env``; None if unset.

    A file that is set but unreadable raises ``OSError``: a misconfigured secret must stop the process, not
    silently leave an API open.
    """
    if path:
        return Path(path).read_text().strip() or None
    return os.environ.get(env) or None


def parse_bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme case-insensitive), else None."""
    if not authorization:
        return None
    parts = authorization.split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    return parts[1]


def bearer_matches(authorization: str | None, expected: str) -> bool:
    """Whether the header carries ``expected``, compared in constant time."""
    given = parse_bearer(authorization)
    return given is not None and hmac.compare_digest(
        given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
    )


def redis_client(url: str, **options: Any) -> aioredis.Redis:
    """An asyncio Redis client for ``url``; the password comes from ``$BRICKYARD_REDIS_PASSWORD`` when the
    URL has none (a ``redis://:password@host`` URL wins)."""
    return aioredis.from_url(url, password=os.environ.get(REDIS_PASSWORD_ENV) or None, **options)
