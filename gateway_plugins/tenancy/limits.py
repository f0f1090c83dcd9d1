"""Rate limits shared by every gateway replica: one Lua script in Redis, one round trip per request.

Limits: requests per minute (RPM) and tokens per minute (TPM) per user, requests per second (RPS)
per model. Each is a **sliding window of 60 buckets** (1 s buckets for a minute, 1/60 s for a
second), a hash per limit key whose fields are bucket numbers. A request is admitted when, for
every limit that applies, the amount counted in the current bucket and the 60 before it plus what
the request needs stays within the limit. Counting the oldest bucket whole, although part of it has
left the window, means the limit is never exceeded over any window-long interval; the price is
that capacity comes back up to one bucket (1/60 of the window) late.

* RPM and RPS: a request needs 1 and, once admitted, counts 1.
* TPM: a request needs 1 token of room (its size is unknown until it finishes) and counts nothing
  on admission; ``charge`` adds the response's actual ``usage.total_tokens`` when it finishes.

The script checks every limit and only if all pass counts the request: atomic, so replicas cannot
admit past a limit between a check and an increment. Time is Redis's own clock (``TIME``), so
replicas with skewed clocks share one window. Stale buckets are deleted as the script meets them
and each key expires two windows after its last increment.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

BUCKETS = 60
Kind = Literal["rpm", "tpm", "rps"]
#: The words OpenAI's ``x-ratelimit-*-<unit>`` headers use for each kind; RPS has no OpenAI header.
_HEADER_UNIT: dict[Kind, str] = {"rpm": "requests", "tpm": "tokens"}

# KEYS[i]: one limit's hash. ARGV: for each key, 4 values: window ms, limit (-1: none), need, add.
# Returns: admitted (1/0), then for each key: used (after counting), retry ms (0 unless it refused),
# reset ms (until the window is empty).
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local used, retry, reset = {}, {}, {}
local admitted = 1
for i = 1, #KEYS do
  local a = (i - 1) * 4
  local window, limit, need = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local width = window / 60
  local oldest = math.floor(now / width) - 60
  local fields = redis.call('HGETALL', KEYS[i])
  local total, newest, stale, live = 0, -1, {}, {}
  for j = 1, #fields, 2 do
    local bucket = tonumber(fields[j])
    if bucket < oldest then
      stale[#stale + 1] = fields[j]
    else
      local count = tonumber(fields[j + 1])
      total = total + count
      live[#live + 1] = {bucket, count}
      if bucket > newest then newest = bucket end
    end
  end
  if #stale > 0 then redis.call('HDEL', KEYS[i], unpack(stale)) end
  used[i], retry[i] = total, 0
  reset[i] = newest >= 0 and math.ceil((newest + 61) * width - now) or 0
  if limit >= 0 and total + need > limit then
    admitted = 0
    retry[i] = window
    table.sort(live, function(x, y) return x[1] < y[1] end)
    local excess = total + need - limit
    for _, entry in ipairs(live) do
      excess = excess - entry[2]
      if excess <= 0 then
        retry[i] = math.ceil((entry[1] + 61) * width - now)
        break
      end
    end
  end
end
if admitted == 1 then
  for i = 1, #KEYS do
    local a = (i - 1) * 4
    local add = tonumber(ARGV[a + 4])
    if add > 0 then
      local window = tonumber(ARGV[a + 1])
      local bucket = math.floor(now / (window / 60))
      redis.call('HINCRBY', KEYS[i], string.format('%d', bucket), add)
      redis.call('PEXPIRE', KEYS[i], window * 2)
      used[i] = used[i] + add
      reset[i] = math.ceil((bucket + 61) * (window / 60) - now)
    end
  end
end
local out = {admitted}
for i = 1, #KEYS do
  out[#out + 1] = used[i]
  out[#out + 1] = retry[i]
  out[#out + 1] = reset[i]
end
return out
"""


@dataclass(frozen=True, slots=True)
class Limit:
    """One limit that applies to a request: its Redis key, window, size, and what the request takes."""

    kind: Kind
    key: str
    window_ms: int
    limit: int
    #: Room the request needs under the limit to be admitted.
    need: int = 1
    #: What the request counts once admitted.
    add: int = 1


def user_rpm(user: str, limit: int) -> Limit:
    return Limit("rpm", f"brickyard:limit:rpm:{user}", 60_000, limit)


def user_tpm(user: str, limit: int, tokens: int = 0) -> Limit:
    """Admission needs one token of room; ``tokens`` > 0 charges a finished request's usage."""
    return Limit("tpm", f"brickyard:limit:tpm:{user}", 60_000, limit, need=0 if tokens else 1, add=tokens)


def model_rps(model: str, limit: int) -> Limit:
    return Limit("rps", f"brickyard:limit:rps:{model}", 1_000, limit)


@dataclass(frozen=True, slots=True)
class LimitState:
    """Where one limit stands after a check."""

    limit: Limit
    used: int
    #: Milliseconds until the request would fit (0 when it did).
    retry_ms: int
    #: Milliseconds until nothing is counted in the window any more.
    reset_ms: int

    @property
    def remaining(self) -> int:
        return max(self.limit.limit - self.used, 0)


@dataclass(frozen=True, slots=True)
class Verdict:
    admitted: bool
    states: tuple[LimitState, ...] = ()
    #: Redis could not be asked; the failure policy decided ``admitted``.
    unchecked: bool = False

    @property
    def refused_by(self) -> LimitState | None:
        """The refusing limit that frees up last (the one the client must wait for)."""
        refusing = [s for s in self.states if s.retry_ms]
        return max(refusing, key=lambda s: s.retry_ms) if refusing else None

    def headers(self) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-*`` headers for the user's RPM and TPM, and ``retry-after`` on a refusal."""
        headers: dict[str, str] = {}
        for state in self.states:
            unit = _HEADER_UNIT.get(state.limit.kind)
            if unit is not None:
                headers[f"x-ratelimit-limit-{unit}"] = str(state.limit.limit)
                headers[f"x-ratelimit-remaining-{unit}"] = str(state.remaining)
                headers[f"x-ratelimit-reset-{unit}"] = openai_duration(state.reset_ms)
        refused = self.refused_by
        if refused is not None:
            headers["retry-after"] = str(max(math.ceil(refused.retry_ms / 1000), 1))
            headers["retry-after-ms"] = str(refused.retry_ms)
        return headers


def openai_duration(ms: int) -> str:
    """Durations as OpenAI writes them in ``x-ratelimit-reset-*``: ``20ms``, ``1.5s``, ``6m0s``."""
    if ms < 1000:
        return f"{ms}ms"
    minutes, seconds = divmod(ms / 1000, 60)
    text = f"{round(seconds, 3):g}s"
    return f"{int(minutes)}m{text}" if minutes else text


class RateLimiter:
    """Checks and counts limits in Redis; on Redis failure applies the policy and says so once."""

    def __init__(self, redis: aioredis.Redis, *, fail_open: bool = True, timeout: float = 0.25) -> None:
        self._script = redis.register_script(_SCRIPT)
        self.fail_open = fail_open
        self.timeout = timeout
        self.redis_errors = 0
        self._failing = False

    async def check(self, limits: Sequence[Limit]) -> Verdict:
        """Admit (and count) a request under every limit in ``limits``, or refuse it, atomically."""
        args: list[int] = []
        for limit in limits:
            args += (limit.window_ms, limit.limit, limit.need, limit.add)
        try:
            async with asyncio.timeout(self.timeout):
                reply = await self._script(keys=[limit.key for limit in limits], args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            return Verdict(self.fail_open, unchecked=True)
        if self._failing:
            self._failing = False
            log.info("rate limits: Redis answers again")
        states = tuple(
            LimitState(limit, int(reply[1 + 3 * i]), int(reply[2 + 3 * i]), int(reply[3 + 3 * i]))
            for i, limit in enumerate(limits)
        )
        return Verdict(bool(reply[0]), states)

    async def charge(self, limits: Sequence[Limit]) -> None:
        """Count finished work (a response's tokens): never refused, only recorded."""
        await self.check([Limit(lm.kind, lm.key, lm.window_ms, -1, 0, lm.add) for lm in limits])

    def _failed(self, exc: BaseException) -> None:
        self.redis_errors += 1
        if not self._failing:
            self._failing = True
            log.warning(
                "rate limits: Redis unreachable, %s requests until it answers (%s)",
                "admitting" if self.fail_open else "refusing",
                exc.__class__.__name__,
            )
