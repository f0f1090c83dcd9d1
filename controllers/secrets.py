"""``brickyard secrets ensure``: the deployment's generated credentials, one Secret made once and copied.

Kustomize cannot generate random values, so the secrets Job (deploy/base/secrets/job.yaml) runs this on
every apply. Hence:

* idempotent: a key is created once and never overwritten, so Redis and the sidecars keep their password
  and token across applies; missing keys are added;
* race-safe: several runs may overlap (a re-apply while the last Job runs, one Job per engine namespace),
  so a Secret created or changed under us is read again and its values kept;
* quiet about values: it reports which keys it wrote, never what.

Copies (``--copy-to``) get the source's values for the named keys; only keys that differ are written.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass

from brickyard_core.kube.client import SECRETS, ApiError, KubeClient, Obj, api_client_from_environment

#: Tries at one Secret that keeps changing between our read and our write.
ATTEMPTS = 5

#: A Secret's ``data``: key -> base64 of the value.
Data = dict[str, str]


@dataclass(frozen=True)
class Outcome:
    """What was done to one Secret: the keys created or changed, never their values."""

    namespace: str
    name: str
    action: str  # created, updated or unchanged
    keys: tuple[str, ...] = ()

    def __str__(self) -> str:
        keys = f" ({', '.join(self.keys)})" if self.keys else ""
        return f"secret {self.namespace}/{self.name}: {self.action}{keys}"


def random_value() -> str:
    """A fresh secret value, base64-encoded for ``data``."""
    return base64.b64encode(secrets.token_urlsafe(32).encode()).decode()


async def converge(
    client: KubeClient, namespace: str, name: str, merge: Callable[[Data], Data]
) -> tuple[Data, Outcome]:
    """Give the Secret the data ``merge(its current data)``: create it with ``merge({})``, else update it if
    that changes anything. A create that finds it there (409), or an update that finds it changed or gone,
    reads it again and merges anew. Returns the data it now holds."""
    current: Obj | None = None
    for _ in range(ATTEMPTS):
        if current is None:
            data = merge({})
            body = {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": name},
                "type": "Opaque",
                "data": data,
            }
            try:
                await client.create(SECRETS, namespace, body)
                return data, Outcome(namespace, name, "created", tuple(sorted(data)))
            except ApiError as exc:
                if not exc.conflict:
                    raise
            current = await client.get(SECRETS, namespace, name)
            if current is None:
                continue  # deleted since: create it again
        old: Data = current.get("data") or {}
        new = merge(old)
        changed = tuple(sorted(k for k, v in new.items() if old.get(k) != v))
        if not changed:
            return old, Outcome(namespace, name, "unchanged")
        try:
            await client.replace(SECRETS, {**current, "data": new})  # its resourceVersion: 409 if stale
            return new, Outcome(namespace, name, "updated", changed)
        except ApiError as exc:
            if not (exc.conflict or exc.not_found):
                raise
        current = await client.get(SECRETS, namespace, name)
    raise ApiError(
        409, "Conflict", f"secret {namespace}/{name} kept changing; gave up after {ATTEMPTS} tries"
    )


async def ensure(
    client: KubeClient, namespace: str, name: str, keys: Sequence[str], copy_to: Iterable[str] = ()
) -> AsyncIterator[Outcome]:
    """Ensure the Secret ``namespace/name`` has ``keys`` (random values for missing ones), then copy those
    keys into each namespace of ``copy_to``; yields what was done to each Secret as it is done."""

    def fill(data: Data) -> Data:
        return {**{key: random_value() for key in keys if key not in data}, **data}

    source, outcome = await converge(client, namespace, name, fill)
    yield outcome
    wanted = {key: source[key] for key in keys}
    for target in dict.fromkeys(copy_to):
        if target != namespace:
            yield (await converge(client, target, name, lambda data: {**data, **wanted}))[1]


async def run(namespace: str, name: str, keys: Sequence[str], copy_to: Sequence[str]) -> None:
    """The command: with the in-cluster service account (else the kubeconfig), one line per Secret."""
    api_client = await asyncio.to_thread(api_client_from_environment)
    try:
        async for outcome in ensure(KubeClient(api_client), namespace, name, keys, copy_to):
            print(outcome, flush=True)
    finally:
        api_client.close()
