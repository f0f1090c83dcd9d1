"""The per-request face of tenancy: who is calling, may they, and what did they use.

The ext_proc stream asks three things, each cheap when it does not apply:

* ``identify`` at the request headers: the tenant, from the API key (``require_api_key``) or the
  ``user`` header; a dict lookup in the users mirror, no round trip.
* ``limits`` once the body names the model, and ``admit``: one Redis round trip for all of them.
* ``record`` when the response finishes: its ``usage`` counted and charged to the tenant's TPM window,
  in the background (``RequestAccounting`` in accounting.py carries one request through these steps).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter

from brickyard_core.credentials import parse_bearer
from gateway_plugins.config import TenancySettings
from gateway_plugins.errors import GatewayError
from gateway_plugins.tenancy.limits import Limit, RateLimiter, Verdict, model_rps, user_rpm, user_tpm
from gateway_plugins.tenancy.usage import Usage
from gateway_plugins.tenancy.users import UserDirectory

log = logging.getLogger(__name__)

#: ``x-error-<cause>`` and OpenAI ``code`` of a refusal, per limit kind.
_REFUSALS = {
    "rpm": ("rpm-exceeded", "rate_limit_exceeded", "requests per minute"),
    "tpm": ("tpm-exceeded", "rate_limit_exceeded", "tokens per minute"),
    "rps": ("model-rps-exceeded", "rate_limit_exceeded", "requests per second"),
}


@dataclass(frozen=True, slots=True)
class Tenant:
    """The caller a request is counted against."""

    name: str
    #: Effective limits (the user's own or the defaults); None: unlimited.
    rpm: int | None
    tpm: int | None


class Tenancy:
    """Users, limits and usage for the whole gateway; its token counters go in ``registry``."""

    def __init__(
        self,
        settings: TenancySettings,
        users: UserDirectory,
        limiter: RateLimiter,
        registry: CollectorRegistry,
    ) -> None:
        self.settings = settings
        self.users = users
        self.limiter = limiter
        self.require_api_key = settings.require_api_key
        self.account_usage = settings.account_usage
        self._default_rpm = rpm = settings.default_rpm
        self._default_tpm = settings.default_tpm
        if self._default_tpm is None and rpm is not None:
            self._default_tpm = rpm * 1000  # AIBrix's default
        self._model_rps = settings.model_rps
        self._charges: set[asyncio.Task[None]] = set()
        #: Refusals by limit kind, for /metrics.
        self.rejections = {"rpm": 0, "tpm": 0, "rps": 0}
        self.prompt_tokens = Counter(
            "brickyard_prompt_tokens",
            "Prompt tokens from the responses' usage, by model and user.",
            ["model", "user"],
            registry=registry,
        )
        self.completion_tokens = Counter(
            "brickyard_completion_tokens",
            "Completion tokens from the responses' usage, by model and user.",
            ["model", "user"],
            registry=registry,
        )
        self.unaccounted = Counter(
            "brickyard_unaccounted_responses",
            "Responses the gateway read for usage that ended without any (client gone, engine error).",
            ["model"],
            registry=registry,
        )

    def identify(self, authorization: str | None, user_header: str | None) -> Tenant | None:
        """The tenant of a request; raises 401 when a key is required and missing or unknown."""
        if self.require_api_key:
            key = parse_bearer(authorization)
            if key is None:
                raise GatewayError(
                    401,
                    "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
                    cause="missing-api-key",
                    code="invalid_api_key",
                )
            if not self.users.loaded:
                raise GatewayError(
                    503,
                    "The gateway cannot check API keys yet: its users store (Redis) is unreachable.",
                    cause="users-unavailable",
                    code="service_unavailable",
                )
            user = self.users.authenticate(key)
            if user is None:
                raise GatewayError(
                    401, "Incorrect API key provided.", cause="invalid-api-key", code="invalid_api_key"
                )
            return self._tenant(user.name, user.rpm, user.tpm)
        if not user_header:
            return None
        user = self.users.get(user_header)
        if user is None:
            return self._tenant(user_header, None, None)
        return self._tenant(user.name, user.rpm, user.tpm)

    def _tenant(self, name: str, rpm: int | None, tpm: int | None) -> Tenant:
        return Tenant(
            name,
            rpm if rpm is not None else self._default_rpm,
            tpm if tpm is not None else self._default_tpm,
        )

    def limits(self, tenant: Tenant | None, model: str) -> list[Limit]:
        """The limits a request for ``model`` by ``tenant`` is checked against (often none)."""
        limits = []
        if tenant is not None:
            if tenant.rpm is not None:
                limits.append(user_rpm(tenant.name, tenant.rpm))
            if tenant.tpm is not None:
                limits.append(user_tpm(tenant.name, tenant.tpm))
        rps = self._model_rps.get(model)
        if rps is not None:
            limits.append(model_rps(model, rps))
        return limits

    async def admit(self, limits: list[Limit]) -> Verdict:
        """Admit and count the request, or raise 429 (over a limit) / 503 (Redis down, fail closed)."""
        verdict = await self.limiter.check(limits)
        if verdict.admitted:
            return verdict
        refused = verdict.refused_by
        if refused is None:  # unchecked and failing closed
            raise GatewayError(
                503,
                "The gateway cannot check rate limits right now; try again shortly.",
                cause="rate-limiter-unavailable",
                code="service_unavailable",
                headers={"retry-after": "1"},
            )
        kind = refused.limit.kind
        self.rejections[kind] += 1
        cause, code, unit = _REFUSALS[kind]
        subject = f"model `{refused.limit.key.rpartition(':')[2]}`" if kind == "rps" else "your account"
        raise GatewayError(
            429,
            f"Rate limit reached for {subject}: {refused.limit.limit} {unit}, "
            f"{refused.used} used. Try again in {refused.retry_ms / 1000:.1f} s.",
            cause=cause,
            code=code,
            headers=verdict.headers(),
        )

    def accounts(self, tenant: Tenant | None) -> bool:
        """Whether the tenant's responses are read for their usage."""
        return tenant is not None and self.account_usage

    def record(self, tenant: Tenant | None, model: str, usage: Usage | None) -> None:
        """An accounted response ended: count its tokens, and charge them to the tenant's TPM window."""
        if usage is None or tenant is None:
            self.unaccounted.labels(model).inc()
            return
        self.prompt_tokens.labels(model, tenant.name).inc(usage.prompt_tokens)
        self.completion_tokens.labels(model, tenant.name).inc(usage.completion_tokens)
        self.charge(tenant, usage)

    def charge(self, tenant: Tenant, usage: Usage) -> None:
        """Add a finished response's tokens to the tenant's TPM window, without holding up the stream."""
        if tenant.tpm is None or usage.total_tokens <= 0:
            return
        task = asyncio.get_running_loop().create_task(
            self.limiter.charge([user_tpm(tenant.name, tenant.tpm, usage.total_tokens)])
        )
        self._charges.add(task)
        task.add_done_callback(self._charges.discard)

    async def flush(self) -> None:
        """Wait for the charges in flight (at shutdown, so no usage is lost)."""
        if self._charges:
            await asyncio.gather(*self._charges, return_exceptions=True)
